"""Small, tested building blocks for the scripts in scripts/.

Each module has one job. Modules import torch, transformers and friends inside the functions
that need them, so that `--help` and config validation stay fast.
"""
