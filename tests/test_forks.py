"""Forks made with `make fork` are tracked against the files they copy (a script, the model file):
audit.py --checks forks says how far upstream has moved and whether it merges in cleanly, and
`make fork-update` carries a clean merge in and refuses a conflicting one, naming the lines. Run in a repository made of this
working tree's files (nothing is committed here), with forks made at test time."""
from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
# this interpreter, and the clone's venv taken as installed (-o): the test builds no venv
MAKE_UPDATE = ["make", "-s", "-o", ".venv/.installed", "fork-update", "NAME=mine", f"PY={sys.executable}"]


def sh(cwd, *args, check=True):
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=check)


def test_fork_status_clean_update_and_conflict(tmp_path):
    clone = tmp_path / "clone"  # this working tree's files (committed or not) as a fresh repository
    listed = sh(REPO, "git", "ls-files", "-co", "--exclude-standard", "-z").stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file() and not rel.startswith("experiments/"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    sh(clone, "git", "init", "-q")
    sh(clone, *GIT, "add", "-A")
    sh(clone, *GIT, "commit", "-q", "-m", "the working tree")
    sh(clone, "make", "-s", "fork", "NAME=mine")
    fork = clone / "experiments" / "mine" / "train.py"
    # the fork changes one line (the default seed)
    fork.write_text(fork.read_text().replace("    seed: int = 0\n", "    seed: int = 7\n"))
    audit = [sys.executable, "scripts/audit.py", "--checks", "forks"]
    out = sh(clone, *audit).stdout
    assert "[PASS] experiments/mine/train.py" in out and "unchanged since" in out

    # upstream changes lines far from the fork's: a clean merge
    upstream = clone / "scripts" / "train.py"
    upstream.write_text(upstream.read_text().replace('    run_name: str = "default"\n', '    run_name: str = "base"\n'))
    sh(clone, *GIT, "commit", "-q", "-am", "upstream: another default run name")
    out = sh(clone, *audit).stdout
    assert "1 upstream commit(s) to scripts/train.py since, merging cleanly" in out and "[PASS]" in out
    update = sh(clone, *MAKE_UPDATE)
    assert "merged in cleanly" in update.stdout
    text = fork.read_text()
    assert "    seed: int = 7\n" in text and '    run_name: str = "base"\n' in text  # both changes
    head = sh(clone, "git", "rev-parse", "HEAD").stdout.strip()
    assert (clone / "experiments" / "mine" / "FORKED_FROM").read_text().splitlines()[0] == f"{head} scripts/train.py"
    assert "unchanged since" in sh(clone, *audit).stdout

    # the model file forked into the same experiment: tracked as its own copy, from its own commit
    sh(clone, "make", "-s", "fork", "NAME=mine", "FILE=lib/model/gpt.py")
    model = clone / "experiments" / "mine" / "gpt.py"
    model.write_text(model.read_text().replace("F.silu(self.gate_proj(x))", "F.gelu(self.gate_proj(x))"))
    out = sh(clone, *audit).stdout
    assert "[PASS] experiments/mine/gpt.py" in out and "lib/model/gpt.py unchanged since" in out
    upstream_model = clone / "lib" / "model" / "gpt.py"
    upstream_model.write_text(upstream_model.read_text().replace("F.silu(self.gate_proj(x))", "F.silu(self.gate_proj(x).float())"))
    sh(clone, *GIT, "commit", "-q", "-am", "upstream: the model's gate in float32")
    failed = sh(clone, *audit, check=False)
    assert failed.returncode == 1 and "[FAIL] experiments/mine/gpt.py" in failed.stdout
    assert "1 upstream commit(s) to lib/model/gpt.py" in failed.stdout and "F.gelu(self.gate_proj(x))" in failed.stdout
    assert "[PASS] experiments/mine/train.py" in failed.stdout  # the script's copy stands as it was
    upstream_model.write_text(upstream_model.read_text().replace("F.silu(self.gate_proj(x).float())", "F.silu(self.gate_proj(x))"))
    sh(clone, *GIT, "commit", "-q", "-am", "upstream: the gate as it was")
    diff = sh(clone, "make", "-s", "-o", ".venv/.installed", "fork-diff", "NAME=mine", f"PY={sys.executable}").stdout
    assert "+    seed: int = 7" in diff and "+            return self.down_proj(F.gelu(self.gate_proj(x))" in diff

    # upstream changes the fork's own line: a conflict, named, and nothing changed
    upstream.write_text(upstream.read_text().replace("    seed: int = 0\n", "    seed: int = 1\n"))
    sh(clone, *GIT, "commit", "-q", "-am", "upstream: another default seed")
    failed = sh(clone, *audit, check=False)
    assert failed.returncode == 1 and "[FAIL] experiments/mine/train.py" in failed.stdout
    assert "seed: int = 7" in failed.stdout
    before = fork.read_bytes()
    refused = sh(clone, *MAKE_UPDATE, check=False)
    assert refused.returncode != 0 and "nothing was changed" in refused.stderr
    line = next(i for i, x in enumerate(before.decode().splitlines(), 1) if x == "    seed: int = 7")
    assert f"train.py:{line}: seed: int = 7" in refused.stderr
    assert fork.read_bytes() == before
