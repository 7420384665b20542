"""What only scripts/audit.py uses: the security scan (security) and the fork tracking (forks).
The training loop imports nothing from here."""
