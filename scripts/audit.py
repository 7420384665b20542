#!/usr/bin/env python
"""Prove things about this checkout, its data and its runs; exit 1 if any check fails.

    python scripts/audit.py                         # environment + data/stdlib integrity
    python scripts/audit.py --checks data run --data data/smoke --run runs/smoke

Checks:
  env   interpreter, packages, devices, bf16 support, GPU monitoring, git state
  data  every corpus/token shard and the tokenizer match the sha256 in their manifests, and the
        manifests agree with each other
  run   every checkpoint's files match the sha256 recorded when it was written; final/ is there
"""
import os
import sys

# Python puts this file's folder first on sys.path, where scripts/tokenize.py would shadow the
# standard library's `tokenize` for everything imported after it: use the repo root instead.
_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

Check = Literal["env", "data", "run"]


@dataclass
class AuditConfig:
    """Which audits to run, and on what."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    checks: tuple[Check, ...] = ("env", "data")
    data: str = "data/stdlib"
    """Tokenized dataset folder for the data check."""
    run: Optional[Path] = None
    """Run folder for the run check."""


class Report:
    def __init__(self):
        self.failures = 0

    def line(self, ok: bool | None, what: str) -> None:
        tag = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        self.failures += ok is False
        print(f"  [{tag}] {what}")


def audit_env(rep: Report) -> None:
    import platform

    from lib.monitor import gpu_status
    from lib.provenance import git_state, package_versions

    rep.line(None, f"python {platform.python_version()} on {platform.platform()}")
    versions = package_versions()
    missing = [k for k, v in versions.items() if v is None]
    rep.line(not missing, "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + (f"; missing: {', '.join(missing)}" if missing else ""))
    import torch

    rep.line(None, f"torch threads {torch.get_num_threads()}, CUDA available: {torch.cuda.is_available()}")
    from lib.model import pick_precision

    rep.line(None, f"CPU bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()} "
             f"(--precision auto picks {pick_precision('auto').replace('no', 'fp32')})")
    rep.line(None, f"GPU monitoring: {gpu_status()}")
    git = git_state()
    rep.line(None, f"git commit {git['commit']}, uncommitted changes: {git['dirty']}")


def audit_data(rep: Report, data: str) -> None:
    from lib.corpus import read_manifest, sha256_file
    from lib.data import tokens_dir

    tok_dir = tokens_dir(data)
    tokens = read_manifest(tok_dir, "tokens")
    corpus_dir = tok_dir / tokens["corpus_dir"]
    corpus = read_manifest(corpus_dir, "corpus")
    for where, manifest, keys in ((corpus_dir, corpus, ("sha256",)), (tok_dir, tokens, ("sha256", "docs_sha256"))):
        bad, n = [], 0
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                for key in keys:
                    name = shard["file"] if key == "sha256" else shard["docs_file"]
                    n += 1
                    path = where / name
                    if not path.is_file() or sha256_file(path) != shard[key]:
                        bad.append(name)
        rep.line(not bad, f"{where}: {n} files match their sha256" if not bad
                 else f"{where}: changed or missing: {', '.join(bad)}")
    rep.line(tokens["corpus_content_hash"] == corpus["content_hash"],
             "token shards were encoded from this corpus (content hash matches)")
    sp = tok_dir / tokens["tokenizer_dir"] / "sp.model"
    rep.line(sp.is_file() and sha256_file(sp) == tokens["sp_model_sha256"],
             f"{sp} is the tokenizer the shards were encoded with")


def audit_run(rep: Report, run: Path) -> None:
    from lib.checkpoint import complete_checkpoints, verify

    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder")
    ckpts = complete_checkpoints(run)
    rep.line(bool(ckpts), f"{len(ckpts)} complete checkpoint(s) in {run / 'checkpoints'}")
    for c in ckpts:
        try:
            state = verify(c)
            rep.line(True, f"{c.name}: step {state['step']}, {len(state['files'])} files match their sha256")
        except UserError as exc:
            rep.line(False, str(exc))
    rep.line((run / "final" / "config.json").is_file(), f"{run / 'final'} holds a saved model")


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(AuditConfig, description=__doc__)
    rep = Report()
    for check in cfg.checks:
        print(f"{check}:")
        if check == "env":
            audit_env(rep)
        elif check == "data":
            audit_data(rep, cfg.data)
        elif check == "run":
            if cfg.run is None:
                raise UserError("the run check needs --run RUN_FOLDER")
            audit_run(rep, cfg.run)
    print("audit: " + ("all checks passed" if not rep.failures else f"{rep.failures} check(s) FAILED"))
    sys.exit(1 if rep.failures else 0)


if __name__ == "__main__":
    main()
