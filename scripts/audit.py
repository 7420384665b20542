#!/usr/bin/env python
"""Prove things about this checkout, its data and its runs; exit 1 if any check fails.

    python scripts/audit.py                         # env, data/stdlib, plugins, forks, security (make audit)
    python scripts/audit.py --checks data run --data data/smoke --run runs/smoke
    python scripts/audit.py --checks security --security.db osv-pypi.zip --strict
    python scripts/audit.py resume --config configs/train/default.yaml

Checks:
  env   interpreter, packages, devices, bf16 support, GPU monitoring, git state
  data  every corpus/token shard and the tokenizer match the sha256 in their manifests, and the
        manifests agree with each other
  run   every checkpoint's files match the sha256 recorded when it was written; final/ is there
  plugins  every plugin (--plugins, installed `lm.plugins` entry points) loads; what each registry
        holds and where each entry came from
  forks every fork under experiments/ (make fork): for each file it copies (a script, the model
        file lib/model/gpt.py), the commit it came from, how many commits have changed that file
        since, and whether those changes merge into the copy cleanly (a three-way merge); one that
        would conflict fails
  security  (--security.parts deps code models)
        deps: installed packages against known advisories: a local OSV database with
          --security.db (offline), else pip-audit when its service answers, else a warning that
          nothing was checked
        code: bandit over scripts/, lib/, experiments/; a medium or high finding fails unless
          configs/bandit_waivers.yaml waives it (id, file, function, reason, date); a waiver
          no finding needs any more is stale
        models: model folders the presets and runs name (and --security.models): pickle weights
          (.bin, .pt) named with the safetensors alternative; custom code and trust_remote_code use
  --strict turns every warning (nothing checked, stale waiver, pickle weights) into a failure.

  fork-update (a subcommand) carries the upstream changes into a fork when they merge cleanly
        (make fork-update NAME=x), and otherwise changes nothing and names the conflicting lines;
        fork-diff (make fork-diff NAME=x) prints what the fork changed in each of its copies.

  resume (a subcommand) trains a training config at tiny size twice, straight through and
        stopped mid-way then resumed in a new process, and checks that every logged loss and
        every final weight is bitwise the same; it names the first diverging step otherwise.

  pack / unpack (subcommands) turn a checkpoint folder into one compressed file, verified by
        reading it back (--remove then deletes the folder), and back; train.py --resume also
        takes the archive itself:
    python scripts/audit.py pack --checkpoint runs/x/checkpoints/step_0000400 --remove
    python scripts/audit.py unpack --archive runs/x/checkpoints/step_0000400.tar.gz
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

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

Check = Literal["env", "data", "run", "plugins", "forks", "security"]
SecurityPart = Literal["deps", "code", "models"]


@dataclass
class SecurityConfig:
    """What the security check looks at."""

    parts: tuple[SecurityPart, ...] = ("deps", "code", "models")
    db: Optional[Path] = None
    """Local advisory database for the dependency part: a folder or .zip/.tar.gz of OSV JSON records
    (osv.dev's PyPI export). Without it, pip-audit is used when its service answers."""
    code: tuple[Path, ...] = (Path("scripts"), Path("lib"), Path("experiments"))
    """Folders and files bandit scans (relative to the repository root)."""
    waivers: Path = Path("configs/bandit_waivers.yaml")
    """Reviewed bandit findings: id, file, function, reason, date each."""
    models: tuple[Path, ...] = ()
    """More model folders to inspect, beside those the presets and runs name."""
    tasks_dir: tuple[Path, ...] = ()
    """lm-evaluation-harness task folders (eval.py --tasks_dir) to inspect for the code their YAML
    files would run (`!function`), with the code part."""


@dataclass
class AuditConfig:
    """Which audits to run, and on what."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    checks: tuple[Check, ...] = ("env", "data", "plugins", "forks", "security")
    data: str = "data/stdlib"
    """Tokenized dataset folder for the data check."""
    run: Optional[Path] = None
    """Run folder for the run check."""
    plugins: tuple[str, ...] = ()
    """Plugins for the plugins check (.py files or module names), as train.py --plugins takes them."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    strict: bool = False
    """Fail on warnings too: an unchecked dependency scan, a stale waiver, pickle weights."""


class Report:
    def __init__(self, strict: bool = False):
        self.failures = 0
        self.warnings = 0
        self.strict = strict

    def line(self, ok: bool | None, what: str) -> None:
        tag = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        self.failures += ok is False
        print(f"  [{tag}] {what}")

    def warn(self, what: str) -> None:
        """Something not checked or worth a look: a failure under --strict."""
        self.warnings += 1
        self.failures += self.strict
        print(f"  [{'FAIL' if self.strict else 'WARN'}] {what}")


def audit_plugins(rep: Report, specs: tuple[str, ...]) -> None:
    from lib import plugins

    report = plugins.load(specs)
    for source, entries in report.loaded.items():
        if not any(f.source == source for f in report.failed):
            rep.line(True, f"plugin {source}: adds {', '.join(entries) or 'nothing'}")
    for failure in report.failed:
        rep.line(False, f"plugin {failure.source} failed to load: {failure.error}")
    if not report.loaded:
        rep.line(None, f"no plugins (none given with --plugins, no installed '{plugins.ENTRY_POINT_GROUP}' entry points)")
    for registry in plugins.REGISTRIES.values():
        names = ", ".join(name + ("" if registry.source(name) == "built-in" else f" ({registry.source(name)})")
                          for name in registry.names())
        rep.line(None, f"{registry.kind}: {names or 'none registered'}")


def audit_forks(rep: Report) -> None:
    from lib.audit import forks

    found = forks.forks(Path(_root))
    if not found:
        rep.line(None, "no forks under experiments/ (make fork NAME=... makes one)")
    for fork in found:
        for st in forks.status(fork, Path(_root)):
            where = f"experiments/{st.name}/{st.copy} (from {st.base[:10]})"
            if not st.upstream_commits:
                rep.line(True, f"{where}: {st.upstream} unchanged since")
            elif st.clean:
                rep.line(True, f"{where}: {st.upstream_commits} upstream commit(s) to {st.upstream} since, merging "
                               f"cleanly (make fork-update NAME={st.name} takes them)")
            else:
                rep.line(False, f"{where}: {st.upstream_commits} upstream commit(s) to {st.upstream} since change "
                                "lines the fork changed: " + "; ".join(st.conflicts[:5])
                                + (" ..." if len(st.conflicts) > 5 else ""))


def audit_task_folders(rep: Report, folders) -> None:
    """What the task YAML files of `folders` would run: a `!function` imports a module from the
    YAML's folder (eval.py refuses it without --allow_task_code)."""
    from lib.model.tasks import scan

    if not folders:
        rep.line(None, "task folders: a task YAML's '!function module.name' runs that module from its folder "
                       "(eval.py --tasks_dir refuses it without --allow_task_code); --security.tasks_dir DIR "
                       "lists what a folder would run")
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"--security.tasks_dir {folder}: no such folder")
        entries = scan(folder)
        for e in entries:
            if e.functions:
                rep.warn(f"{e.path}: runs code from {e.path.parent} ({', '.join('!function ' + f for f in e.functions)}); "
                         "read it before passing eval.py --allow_task_code")
            if e.error:
                rep.warn(f"{e.path}: not readable as a task ({e.error})")
        if not any(e.functions for e in entries):
            rep.line(True, f"{folder}: {len(entries)} task YAML file(s), none runs code (!function)")


def audit_security(rep: Report, cfg: SecurityConfig) -> None:
    from lib.audit import security

    root = Path(_root)
    if "deps" in cfg.parts:
        packages = security.installed()
        if cfg.db is not None:
            n, found = security.scan_database(cfg.db, packages)
            if n == 0:
                rep.warn(f"dependencies NOT checked: {cfg.db} holds no PyPI advisories")
            else:
                rep.line(not found, f"{len(packages)} installed packages matched against {n} PyPI advisories in "
                                    f"{cfg.db}: " + ("none affects an installed version" if not found
                                                     else f"{len(found)} affect installed versions"))
        else:
            why = security.service_answers()
            if why is None:
                try:
                    found = security.run_pip_audit()
                    rep.line(not found, f"pip-audit (OSV service) over {len(packages)} installed packages: "
                             + (f"{len(found)} known vulnerabilities" if found else "no known vulnerabilities"))
                except UserError as exc:
                    found = None
                    rep.warn(f"dependencies NOT checked: {exc}")
            else:
                found = None
                rep.warn(f"dependencies NOT checked for known vulnerabilities: {why}, and no local database was "
                         "given (--security.db FOLDER_OR_ZIP of OSV records, e.g. osv.dev's PyPI all.zip copied "
                         "to this machine)")
        for adv in found or []:
            fix = f"; fixed in {', '.join(adv.fixed)}" if adv.fixed else "; no fixed version named"
            rep.line(False, f"{adv.package} {adv.version}: {adv.id} {adv.summary}{fix}")
    if "code" in cfg.parts:
        waivers_path = cfg.waivers if cfg.waivers.is_absolute() else root / cfg.waivers
        paths = [p if p.is_absolute() else root / p for p in cfg.code]
        scan = security.triage(security.bandit(paths, root), security.load_waivers(waivers_path))
        for f in scan.failing:
            rep.line(False, f"{f.id} {f.severity} {f.where()}: {f.text} (fix it, or waive it in {cfg.waivers} with "
                            "the reason)")
        rep.line(not scan.failing, f"bandit over {', '.join(map(str, cfg.code))}: {len(scan.failing)} medium/high "
                                   f"finding(s) not waived, {len(scan.waived)} waived in {cfg.waivers}")
        for w in scan.stale:
            rep.warn(f"stale waiver in {cfg.waivers}: {w.id} in {w.file} ({w.function}) matches no finding now; "
                     "remove it")
        audit_task_folders(rep, cfg.tasks_dir)
        if scan.low:
            counts: dict[str, int] = {}
            for f in scan.low:
                counts[f.id] = counts.get(f.id, 0) + 1
            rep.line(None, f"{len(scan.low)} low-severity finding(s), not failing: "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if "models" in cfg.parts:
        from lib.model import registry

        folders: dict[Path, str] = {}
        for value, where in security.model_folders_named(root).items():
            try:
                folders.setdefault(registry.resolve(value, option=f"model.init_from in {where}"), where)
            except UserError:
                rep.line(None, f"{value} (named in {where}) is not on this machine: not inspected")
        for folder in cfg.models:
            if not folder.is_dir():
                raise UserError(f"--security.models {folder}: no such folder")
            folders.setdefault(folder, "--security.models")
        for folder, where in folders.items():
            found = security.inspect_model_folder(folder)
            if found.pickle_files:
                alt = ("it also holds .safetensors weights, which the loader prefers; delete the pickle files"
                       if found.safetensors else "get its model.safetensors instead (most hub repositories carry "
                       "one), or load it once on a trusted machine and save_pretrained() it, which writes "
                       "safetensors")
                rep.warn(f"{folder} (from {where}): pickle-format weights {', '.join(found.pickle_files)} can run code "
                         f"when loaded; {alt}")
            else:
                rep.line(True, f"{folder} (from {where}): no pickle-format weights")
            if found.custom_code:
                rep.line(None, f"{folder}: config.json maps classes to its own code ({', '.join(found.custom_code)}), "
                               "which runs only with --model.trust_remote_code")
        if not folders:
            rep.line(None, "no model folders named by configs/ or runs/ (--security.models adds some)")
        uses = security.remote_code_uses(root)
        rep.line(None, "trust_remote_code: " + ("; ".join(uses) if uses else "off everywhere (presets, runs, code)"))


@dataclass
class ForkConfig:
    """A fork's files against the project's (make fork-update, make fork-diff)."""

    name: str
    """The fork: experiments/NAME."""


def fork_update_command(cfg: ForkConfig) -> None:
    """Carry the changes made to a fork's files since its commit into the fork (clean merges only)."""
    from lib.audit import forks

    for st in forks.update(Path(_root) / "experiments" / cfg.name, Path(_root)):
        if not st.upstream_commits:
            print(f"experiments/{cfg.name}/{st.copy}: {st.upstream} has not changed since {st.base[:10]}; nothing to do")
        else:
            print(f"experiments/{cfg.name}/{st.copy}: {st.upstream_commits} upstream commit(s) since {st.base[:10]} "
                  f"merged in cleanly; {forks.STAMP} now names HEAD (make fork-diff NAME={cfg.name} shows the fork's "
                  "own changes)")


def fork_diff_command(cfg: ForkConfig) -> None:
    """What a fork changed in each of its files since the commit it was copied at (a unified diff)."""
    from lib.audit import forks

    print(forks.diff(Path(_root) / "experiments" / cfg.name, Path(_root)), end="")


def audit_env(rep: Report) -> None:
    import platform

    from lib.records.monitor import gpu_status
    from lib.records.provenance import git_state, package_versions

    rep.line(None, f"python {platform.python_version()} on {platform.platform()}")
    versions = package_versions()
    missing = [k for k, v in versions.items() if v is None]
    rep.line(not missing, "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + (f"; missing: {', '.join(missing)}" if missing else ""))
    import torch

    rep.line(None, f"torch threads {torch.get_num_threads()}, CUDA available: {torch.cuda.is_available()}")
    from lib.train.precision import resolve

    # oneDNN's flag is True on any AVX-512 CPU, native bf16 or not: auto decides by measurement
    choice = resolve("auto")
    rep.line(None, f"CPU bf16 kernels reported by oneDNN: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
             f"--precision auto picks {choice.name} for the default preset's model ({choice.reason})")
    rep.line(None, f"GPU monitoring: {gpu_status()}")
    git = git_state()
    rep.line(None, f"git commit {git['commit']}, uncommitted changes: {git['dirty']}")


def audit_data(rep: Report, data: str) -> None:
    from lib.data.corpus import read_manifest
    from lib.files import folder_digest, sha256_mismatches
    from lib.data.batches import shard_problems, tokens_dir
    from lib.data.tokenizer import tokenizer_fingerprint

    tok_dir = tokens_dir(data)
    tokens = read_manifest(tok_dir, "tokens")
    corpus_dir = tok_dir / tokens["corpus_dir"]
    corpus = read_manifest(corpus_dir, "corpus")
    table = {shard["file"]: shard["sha256"] for split in corpus["splits"].values() for shard in split["shards"]}
    bad = [name for name, _ in sha256_mismatches(table, folder_digest(corpus_dir))]
    rep.line(not bad, f"{corpus_dir}: {len(table)} files match their sha256" if not bad
             else f"{corpus_dir}: changed or missing: {', '.join(bad)}")
    bad = shard_problems(tok_dir, tokens)
    n_files = sum(len([k for k in ("file", "docs_file", "mask_file") if k in e])
                  for split in tokens["splits"].values() for e in split["shards"])
    rep.line(not bad, f"{tok_dir}: {n_files} files match their sha256, every token id within the vocabulary"
             if not bad else f"{tok_dir}: " + "; ".join(f"{name} {why}" for name, why in bad))
    rep.line(tokens["corpus_content_hash"] == corpus["content_hash"],
             "token shards were encoded from this corpus (content hash matches)")
    tokenizer = (tok_dir / tokens["tokenizer_dir"]).resolve()
    rep.line(tokenizer_fingerprint(tokenizer) == tokens["tokenizer_sha256"],
             f"{tokenizer} is the tokenizer the shards were encoded with")


def audit_run(rep: Report, run: Path) -> None:
    from lib.records import archive
    from lib.records.checkpoint import archived_checkpoints, complete_checkpoints, verify
    from lib.files import CHECKSUMS, verify_checksums

    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder")
    ckpts, packed = complete_checkpoints(run), archived_checkpoints(run)
    rep.line(bool(ckpts or packed), f"{len(ckpts)} complete checkpoint(s)" + (
        f" and {len(packed)} packed" if packed else "") + f" in {run / 'checkpoints'}")
    for c in ckpts:
        try:
            state = verify(c)
            rep.line(True, f"{c.name}: step {state['step']}, {len(state['files'])} files match their sha256")
        except UserError as exc:
            rep.line(False, str(exc))
    for c in packed:
        try:
            rep.line(True, f"{c.name}: {len(archive.verify(c))} files match their sha256 (gzip trailer checked)")
        except UserError as exc:
            rep.line(False, str(exc))
    for folder in (run / "final", run / "final_adapter"):
        if folder.name == "final_adapter" and not folder.is_dir():
            continue  # only LoRA runs have one
        try:
            n = len(verify_checksums(folder))
            rep.line(True, f"{folder}: {n} files match {CHECKSUMS}")
        except UserError as exc:
            rep.line(False, f"{folder}: {exc}")


@dataclass
class ResumeCheckConfig:
    """Resume equivalence of a training config, at tiny size."""

    config: Path = Path("configs/train/default.yaml")
    """The training config (YAML) to check."""
    steps: int = 8
    stop_at: int = 3
    """Stop the interrupted run after this step, then resume it."""
    train_script: Path = Path(_root) / "scripts" / "train.py"
    """The training script to check: a copy under experiments/ with a changed loop, say."""
    train_args: str = ""
    """More training flags for both runs, as one string: a plugin's loss, say
    (--train_args="--plugins experiments/zloss/zloss.py --loss.name zloss")."""
    keep_size: bool = False
    """Keep the config's model and batch size instead of shrinking them (slower)."""
    precision: str = "fp32"
    """Precision of both runs; 'config' keeps the config's. fp32 by default: bf16 autocast on CPUs
    with AMX can differ in the last bits between two identical processes, whatever the loop does."""
    work_dir: Optional[Path] = None
    """Where the two runs go (default: a temporary folder, deleted afterwards)."""


def resume_check(cfg: ResumeCheckConfig) -> None:
    import json
    import shlex
    import shutil
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    if not cfg.config.is_file():
        raise UserError(f"--config {cfg.config}: no such file")
    if not 0 < cfg.stop_at < cfg.steps:
        raise UserError(f"--stop_at must be between 1 and --steps - 1 ({cfg.steps - 1})")
    user = config_lib.load_yaml(cfg.config)
    work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="resume-check-"))
    if not cfg.train_script.is_file():
        raise UserError(f"--train_script {cfg.train_script}: no such file")
    train = [sys.executable, str(cfg.train_script), "--config", str(cfg.config),
             "--runs_dir", str(work), "--max_steps", str(cfg.steps), "--log_every", "1", "--eval_every", "0",
             "--checkpoint_every", "0", "--eval_tokens", "2000", "--max_minutes", "None", "--no_compile",
             "--overwrite", "--deterministic"]
    if not cfg.keep_size and not (user.get("model") or {}).get("init_from"):
        train += ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads",
                  "None", "--model.d_ff", "None", "--data.seq_len", "64", "--micro_batch_size", "2"]
    if cfg.precision != "config":
        train += ["--precision", cfg.precision]
    train += shlex.split(cfg.train_args)
    if "TrackingConfig" in cfg.train_script.read_text(encoding="utf-8"):  # forks older than tracking lack the flag
        train += ["--tracking.no_mlflow"]  # check runs, not experiments: nothing to file in MLflow
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def start(label, *extra):  # -> (process, its log, what it was)
        log = open(work / f"{label}.log", "w+")  # a file: nobody reads a pipe while we wait
        proc = subprocess.Popen(train + list(extra), stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        return proc, log, " ".join(extra)

    def finish(job):
        proc, log, what = job
        with log:
            if proc.wait() != 0:
                log.seek(0)
                raise UserError(f"training {what} failed:\n{log.read()[-2000:]}")

    def go(label, *extra):
        finish(start(label, *extra))

    # --deterministic runs use one thread each: with a second core, the straight run goes beside
    # the stopped-and-resumed one
    parallel = (os.cpu_count() or 1) > 1
    print(f"resume check of {cfg.config}: {cfg.steps} steps straight, and stopped after {cfg.stop_at} then "
          f"resumed ({'full size' if cfg.keep_size else 'tiny size'}{', side by side' if parallel else ''}) "
          f"in {work}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    straight = None
    try:
        if parallel:
            straight = start("straight", "--run_name", "straight")
        else:
            go("straight", "--run_name", "straight")
        go("stopped", "--run_name", "resumed", "--stop_at_step", str(cfg.stop_at))
        go("resumed", "--run_name", "resumed", "--resume", "auto", "--no_overwrite")
        if straight is not None:
            job, straight = straight, None
            finish(job)

        def losses(name):
            rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
            return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}

        a, b = losses("straight"), losses("resumed")
        rep = Report()
        diverged = [s for s in sorted(a) if a[s] != b.get(s)]
        rep.line(not diverged, "every logged loss is bitwise equal" if not diverged else
                 f"first diverging step {diverged[0]}: straight {a[diverged[0]]!r}, resumed {b.get(diverged[0])!r}")
        wa = load_file(work / "straight" / "final" / "model.safetensors")
        wb = load_file(work / "resumed" / "final" / "model.safetensors")
        differ = [k for k in wa if k not in wb or not (wa[k] == wb[k]).all()]
        rep.line(not differ, "every final weight is bitwise equal" if not differ else
                 f"{len(differ)} weight tensor(s) differ, first {differ[0]}")
    finally:
        if straight is not None:  # the other half failed: stop this one too
            straight[0].kill()
            straight[0].wait()
            straight[1].close()
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("resume check: " + ("PASS" if not rep.failures else "FAIL"))
    sys.exit(1 if rep.failures else 0)


@dataclass
class PackConfig:
    """Pack a checkpoint folder into one .tar.gz, checked by reading it back."""

    checkpoint: Path
    """The checkpoint folder (runs/<run>/checkpoints/step_NNNNNNN)."""
    out: Optional[Path] = None
    """The archive to write (default: the folder's path + .tar.gz)."""
    remove: bool = False
    """Delete the folder once the archive is written and checked."""
    level: int = 6
    """gzip compression level, 1 (fastest) to 9 (smallest)."""


@dataclass
class UnpackConfig:
    """Unpack a checkpoint archive into a checkpoints folder, verified."""

    archive: Path
    into: Optional[Path] = None
    """The checkpoints folder to unpack into (default: the archive's own folder)."""


def pack_command(cfg: PackConfig) -> None:
    from lib.records.archive import pack
    from lib.records.checkpoint import folder_bytes

    before = folder_bytes(cfg.checkpoint) if cfg.checkpoint.is_dir() else 0
    out = pack(cfg.checkpoint, cfg.out, cfg.remove, cfg.level)
    size = out.stat().st_size
    print(f"packed {cfg.checkpoint} ({before / 1e6:.1f} MB) into {out} ({size / 1e6:.1f} MB, "
          f"{size / max(before, 1):.1%} of it); every file checked against its sha256"
          + ("; folder removed" if cfg.remove else ""))


def unpack_command(cfg: UnpackConfig) -> None:
    from lib.records.archive import unpack

    print(f"unpacked {cfg.archive} into {unpack(cfg.archive, cfg.into or cfg.archive.parent)} (verified)")


@exit_on_user_error
def main() -> None:
    for name, cls, run in (("pack", PackConfig, pack_command), ("unpack", UnpackConfig, unpack_command),
                           ("fork-update", ForkConfig, fork_update_command),
                           ("fork-diff", ForkConfig, fork_diff_command)):
        if sys.argv[1:2] == [name]:
            return run(config_lib.parse(cls, sys.argv[2:], description=(run.__doc__ or cls.__doc__),
                                        prog=f"{os.path.basename(sys.argv[0])} {name}", presets=False))
    if sys.argv[1:2] == ["resume"]:
        return resume_check(config_lib.parse(ResumeCheckConfig, sys.argv[2:], description=ResumeCheckConfig.__doc__,
                                             prog=f"{os.path.basename(sys.argv[0])} resume", presets=False))
    cfg = config_lib.parse(AuditConfig, description=__doc__,
                           prog=f"{os.path.basename(sys.argv[0])} [resume|pack|unpack|fork-update|fork-diff]")
    rep = Report(cfg.strict)
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
        elif check == "plugins":
            audit_plugins(rep, cfg.plugins)
        elif check == "forks":
            audit_forks(rep)
        elif check == "security":
            audit_security(rep, cfg.security)
    warned = f" ({rep.warnings} warning(s); --strict fails on them)" if rep.warnings and not rep.strict else ""
    print("audit: " + ("all checks passed" + warned if not rep.failures else f"{rep.failures} check(s) FAILED"))
    sys.exit(1 if rep.failures else 0)


if __name__ == "__main__":
    main()
