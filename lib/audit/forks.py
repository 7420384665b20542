"""Forks (`make fork NAME=x`): copies of the project's files in experiments/x/, each stamped in
experiments/x/FORKED_FROM with the commit it was copied at and the file it copies, one line per
copy (`<commit> scripts/train.py`, `<commit> lib/model/gpt.py`), and what has happened upstream since.

status() says, for each copy of a fork, how many commits have changed its file since the copy's
commit and whether those changes touch lines the fork changed: a three-way merge of the fork's copy
(ours), the file at the fork's commit (base) and the file now (theirs), by `git merge-file`.
update() carries the upstream changes into the fork when every copy merges cleanly, and re-stamps
it with the commit it now matches; with a conflict it changes nothing and names the conflicting
lines. diff() is what the fork changed in each copy. A stamp of an older form (a lone commit on
its first line) names a copy of a scripts/ file of the same name.
"""
from __future__ import annotations

import difflib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lib.errors import UserError

STAMP = "FORKED_FROM"
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class ForkStatus:
    name: str
    copy: str  # the copy's file name in experiments/<name>/
    upstream: str  # the file it copies, relative to the repository (scripts/train.py, lib/model/gpt.py)
    base: str  # the commit it was forked from (or last updated to)
    upstream_commits: int  # commits since `base` that changed the file
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


def copies(fork: Path, repo: Path) -> list[tuple[str, str, str]]:
    """(copy's file name, the file it copies, the commit) for each copy the fork's stamp names."""
    stamp = fork / STAMP
    if not stamp.is_file():
        raise UserError(f"{fork} is not a stamped fork (no {STAMP}; make fork NAME=... makes one)")
    found = []
    for number, line in enumerate(stamp.read_text().splitlines(), 1):
        words = line.split()
        if len(words) == 2 and COMMIT.fullmatch(words[0]):
            found.append((Path(words[1]).name, words[1], words[0]))
        elif number == 1 and len(words) == 1 and COMMIT.fullmatch(words[0]):  # the older stamp: a scripts/ copy
            scripts = [p.name for p in fork.glob("*.py") if (repo / "scripts" / p.name).is_file()]
            if len(scripts) != 1:
                raise UserError(f"{stamp}: expected one copy of a scripts/ file beside it, found {scripts or 'none'}")
            found.append((scripts[0], f"scripts/{scripts[0]}", words[0]))
    if not found:
        raise UserError(f"{stamp} names no copy (lines of `<commit> <file>`, as make fork writes them)")
    return found


def _status_of(fork: Path, repo: Path, copy: str, upstream: str, base: str) -> ForkStatus:
    if _git(repo, "cat-file", "-e", f"{base}:{upstream}", check=False).returncode != 0:
        raise UserError(f"{fork / STAMP}: commit {base} does not hold {upstream} in this repository")
    if not (fork / copy).is_file():
        raise UserError(f"{fork / STAMP} names {upstream}, but {fork / copy} is missing")
    count = int(_git(repo, "rev-list", "--count", f"{base}..HEAD", "--", upstream).stdout.strip() or 0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, old, theirs = Path(tmp, "ours"), Path(tmp, "base"), Path(tmp, "theirs")
        ours.write_text((fork / copy).read_text(encoding="utf-8"), encoding="utf-8")
        old.write_text(_git(repo, "show", f"{base}:{upstream}").stdout, encoding="utf-8")
        theirs.write_text((repo / upstream).read_text(encoding="utf-8"), encoding="utf-8")
        merge = _git(repo, "merge-file", "-p", "-L", f"experiments/{fork.name}/{copy}", "-L", f"{upstream}@{base[:10]}",
                     "-L", upstream, str(ours), str(old), str(theirs), check=False)
    if merge.returncode < 0 or merge.returncode > 127:
        raise UserError(f"git merge-file failed on {fork / copy}: {merge.stderr.strip()}")
    out = ForkStatus(fork.name, copy, upstream, base, count)
    if merge.returncode == 0:
        out.merged = merge.stdout
    else:  # the fork's side of each conflict, found in the fork's file for its line number
        mine = (fork / copy).read_text(encoding="utf-8").splitlines()
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
                lines.append(f"{copy}:{at + 1}: {line.strip()}")
        out.conflicts = lines or ["(the fork removed lines upstream changed)"]
    return out


def status(fork: Path, repo: Path) -> list[ForkStatus]:
    """Where each copy of the fork stands against its file now (see the module docstring)."""
    return [_status_of(fork, repo, *c) for c in copies(fork, repo)]


def update(fork: Path, repo: Path) -> list[ForkStatus]:
    """Carry the upstream changes into the fork when every copy merges cleanly (its files then
    hold both, and its stamp names HEAD); otherwise raise a UserError naming the conflicting lines
    and leave the fork as it was."""
    from lib.files import atomic_text

    states = status(fork, repo)
    conflicts = [line for st in states for line in st.conflicts]
    if conflicts:
        moved = ", ".join(f"{st.upstream} ({st.upstream_commits} commit(s) since {st.base[:10]})"
                          for st in states if not st.clean)
        shown = "\n  ".join(conflicts[:20]) + (f"\n  ... {len(conflicts) - 20} more" if len(conflicts) > 20 else "")
        raise UserError(f"experiments/{fork.name}: upstream changes to {moved} touch lines the fork changed too; "
                        f"nothing was changed. The fork's conflicting lines:\n  {shown}\nMerge by hand (make fork-diff "
                        f"NAME={fork.name} shows the fork's own changes), then put the commit you merged in "
                        f"{STAMP}'s line for that file.")
    if any(st.upstream_commits for st in states):
        head = _git(repo, "rev-parse", "HEAD").stdout.strip()
        for st in states:
            if st.upstream_commits:
                with atomic_text(fork / st.copy) as f:
                    f.write(st.merged)
        with atomic_text(fork / STAMP) as f:
            f.write("".join(f"{head} {st.upstream}\n" for st in states))
            f.write("".join(f"updated {st.upstream} from {st.base}\n" for st in states if st.upstream_commits))
    return states


def diff(fork: Path, repo: Path) -> str:
    """The fork's own changes: each copy against its file at the copy's commit, as a unified diff."""
    out = []
    for copy, upstream, base in copies(fork, repo):
        old = _git(repo, "show", f"{base}:{upstream}").stdout.splitlines(keepends=True)
        new = (fork / copy).read_text(encoding="utf-8").splitlines(keepends=True)
        out.extend(difflib.unified_diff(old, new, f"{upstream}@{base[:10]}", f"experiments/{fork.name}/{copy}"))
    return "".join(out)
