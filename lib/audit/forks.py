"""Forks of a script (`make fork NAME=x`: experiments/x/<script>.py, stamped with the commit it was
copied from in experiments/x/FORKED_FROM), and what has happened upstream since.

status() says, for a fork, how many commits have changed the script since the fork's commit and
whether those changes touch lines the fork changed: a three-way merge of the fork's copy (ours),
the script at the fork's commit (base) and the script now (theirs), by `git merge-file`. update()
carries the upstream changes into the fork when that merge is clean, and re-stamps it with the
commit it now matches; with a conflict it changes nothing and names the conflicting lines.
"""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lib.errors import UserError

STAMP = "FORKED_FROM"


@dataclass
class ForkStatus:
    name: str
    script: str  # scripts/<script>.py, the file the fork copies
    base: str  # the commit it was forked from (or last updated to)
    upstream_commits: int  # commits since `base` that changed the script
    conflicts: list[str] = field(default_factory=list)  # lines of the fork an update would conflict on
    merged: str = ""  # the fork with the upstream changes carried in (when there is no conflict)

    @property
    def clean(self) -> bool:
        return not self.conflicts


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise UserError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def forks(repo: Path) -> list[Path]:
    """The stamped fork folders under experiments/."""
    return sorted(p.parent for p in (repo / "experiments").glob(f"*/{STAMP}"))


def _script_of(fork: Path, repo: Path) -> str:
    found = [p.name for p in fork.glob("*.py") if (repo / "scripts" / p.name).is_file()]
    if len(found) != 1:
        raise UserError(f"{fork}: expected one copy of a scripts/ file in it, found {found or 'none'}")
    return found[0]


def status(fork: Path, repo: Path) -> ForkStatus:
    """Where the fork stands against the script now (see the module docstring)."""
    stamp = fork / STAMP
    if not stamp.is_file():
        raise UserError(f"{fork} is not a stamped fork (no {STAMP}; make fork NAME=... makes one)")
    base = stamp.read_text().split()[0] if stamp.read_text().split() else ""
    script = _script_of(fork, repo)
    upstream = f"scripts/{script}"
    if _git(repo, "cat-file", "-e", f"{base}:{upstream}", check=False).returncode != 0:
        raise UserError(f"{stamp}: commit {base or '(none)'} does not hold {upstream} in this repository")
    count = int(_git(repo, "rev-list", "--count", f"{base}..HEAD", "--", upstream).stdout.strip() or 0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, old, theirs = Path(tmp, "ours"), Path(tmp, "base"), Path(tmp, "theirs")
        ours.write_text((fork / script).read_text(encoding="utf-8"), encoding="utf-8")
        old.write_text(_git(repo, "show", f"{base}:{upstream}").stdout, encoding="utf-8")
        theirs.write_text((repo / upstream).read_text(encoding="utf-8"), encoding="utf-8")
        merge = _git(repo, "merge-file", "-p", "-L", f"experiments/{fork.name}/{script}", "-L", f"{upstream}@{base[:10]}",
                     "-L", upstream, str(ours), str(old), str(theirs), check=False)
    if merge.returncode < 0 or merge.returncode > 127:
        raise UserError(f"git merge-file failed on {fork / script}: {merge.stderr.strip()}")
    out = ForkStatus(fork.name, script, base, count)
    if merge.returncode == 0:
        out.merged = merge.stdout
    else:  # the fork's side of each conflict, found in the fork's file for its line number
        mine = (fork / script).read_text(encoding="utf-8").splitlines()
        lines, side, at = [], None, 0
        for line in merge.stdout.splitlines():
            if line.startswith("<<<<<<< "):
                side = "ours"
            elif line.startswith("=======") and side == "ours":
                side = "theirs"
            elif line.startswith(">>>>>>> "):
                side = None
            elif side == "ours":
                at = next((i for i in range(at, len(mine)) if mine[i] == line), at)
                lines.append(f"{script}:{at + 1}: {line.strip()}")
        out.conflicts = lines or ["(the fork removed lines upstream changed)"]
    return out


def update(fork: Path, repo: Path) -> ForkStatus:
    """Carry the upstream changes into the fork when they merge cleanly (the fork's file then holds
    both, and its stamp names HEAD); otherwise raise a UserError naming the conflicting lines and
    leave the fork as it was."""
    st = status(fork, repo)
    if not st.clean:
        shown = "\n  ".join(st.conflicts[:20]) + (f"\n  ... {len(st.conflicts) - 20} more" if len(st.conflicts) > 20 else "")
        raise UserError(f"experiments/{fork.name}: the {st.upstream_commits} upstream commit(s) to scripts/{st.script} since "
                        f"{st.base[:10]} change lines the fork changed too; nothing was changed. The fork's "
                        f"conflicting lines:\n  {shown}\nMerge by hand (make fork-diff NAME={fork.name} shows the fork's "
                        "own changes), then set the first line of FORKED_FROM to the commit you merged.")
    if st.upstream_commits:
        from lib.files import atomic_text

        head = _git(repo, "rev-parse", "HEAD").stdout.strip()
        with atomic_text(fork / st.script) as f:
            f.write(st.merged)
        with atomic_text(fork / STAMP) as f:
            f.write(f"{head}\nupdated from {st.base}\n")
    return st
