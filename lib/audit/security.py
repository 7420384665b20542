"""Security checks for scripts/audit.py: installed packages against known advisories, the code
against bandit with a waivers file, and model folders for pickle weights and custom code.

Dependencies are checked offline against a local advisory database when one is given (a folder
or .zip/.tar.gz archive of OSV records, the format of https://osv.dev's PyPI export), else with
pip-audit when its vulnerability service answers, else not at all, and the caller says so: an
unchecked environment is never reported as free of known vulnerabilities.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

from lib.errors import UserError

OSV_SERVICE = "https://api.osv.dev/v1/query"  # LM_OSV_SERVICE: another address to probe
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SEVERITIES = ("LOW", "MEDIUM", "HIGH")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (Foo_Bar.baz -> foo-bar-baz)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- dependencies -------------------------------------------------------------------------------

@dataclass
class Advisory:
    package: str
    version: str
    id: str
    summary: str
    fixed: list[str] = field(default_factory=list)


def installed() -> dict[str, str]:
    """Every distribution installed in this interpreter's environment: normalized name -> version."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def osv_records(db: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every JSON record in an OSV folder (searched recursively) or archive."""
    if not db.exists():
        raise UserError(f"--security.db {db}: no such folder or archive (give a folder or .zip/.tar.gz of OSV "
                        "JSON records, e.g. the PyPI export from https://osv.dev)")

    def parse(where: str, raw: bytes):
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"--security.db: {where} is not valid JSON ({exc}); re-fetch the database") from None
        if not isinstance(record, dict):
            raise UserError(f"--security.db: {where} holds no OSV record (a JSON object with 'id' and 'affected')")
        return where, record

    if db.is_dir():
        for path in sorted(db.rglob("*.json")):
            yield parse(str(path), path.read_bytes())
    elif zipfile.is_zipfile(db):
        with zipfile.ZipFile(db) as zf:
            for name in sorted(n for n in zf.namelist() if n.endswith(".json")):
                yield parse(f"{db}:{name}", zf.read(name))
    elif tarfile.is_tarfile(db):
        with tarfile.open(db) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    yield parse(f"{db}:{member.name}", tf.extractfile(member).read())
    else:
        raise UserError(f"--security.db {db}: neither a folder nor a .zip/.tar.gz archive of OSV records")


def _version(text: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return None


def _in_range(version, events: list[dict]) -> bool:
    """Whether `version` falls in an OSV ECOSYSTEM range: its events sorted by version, the last
    one at or below the version decides (introduced opens, fixed/limit close at, last_affected
    closes after)."""
    parsed = []
    for ev in events:
        for kind in ("introduced", "fixed", "last_affected", "limit"):
            if kind in ev:
                at = _version("0" if ev[kind] == "0" else str(ev[kind]))
                if at is not None:
                    parsed.append((at, kind))
    affected = False
    for at, kind in sorted(parsed, key=lambda e: e[0]):
        if kind == "introduced" and version >= at:
            affected = True
        elif kind in ("fixed", "limit") and version >= at:
            affected = False
        elif kind == "last_affected" and version > at:
            affected = False
    return affected


def affects(record: dict, package: str, version: str) -> Optional[list[str]]:
    """The fixed versions named by an OSV record that affects `package` at `version` (an empty list
    when none is named), or None when it does not affect it."""
    if record.get("withdrawn"):
        return None
    v = _version(version)
    for aff in record.get("affected") or []:
        pkg = aff.get("package") or {}
        if pkg.get("ecosystem") != "PyPI" or normalize(pkg.get("name", "")) != package:
            continue
        fixed = [str(ev["fixed"]) for r in aff.get("ranges") or [] for ev in r.get("events") or [] if "fixed" in ev]
        if version in (aff.get("versions") or []):
            return fixed
        if v is not None and any(r.get("type") in ("ECOSYSTEM", "SEMVER") and _in_range(v, r.get("events") or [])
                                 for r in aff.get("ranges") or []):
            return fixed
    return None


def scan_database(db: Path, packages: dict[str, str]) -> tuple[int, list[Advisory]]:
    """(how many PyPI advisories the database holds, those that affect an installed version)."""
    n, found = 0, []
    for _, record in osv_records(db):
        names = {normalize((a.get("package") or {}).get("name", "")) for a in record.get("affected") or []
                 if (a.get("package") or {}).get("ecosystem") == "PyPI"}
        n += bool(names)
        for name in sorted(names & packages.keys()):
            fixed = affects(record, name, packages[name])
            if fixed is not None:
                summary = record.get("summary") or (record.get("details") or "").strip().split("\n")[0][:120]
                found.append(Advisory(name, packages[name], str(record.get("id", "?")), summary, fixed))
    return n, found


def service_answers(timeout: float = 5.0) -> Optional[str]:
    """None when the vulnerability service answers a query; otherwise why not, in words."""
    import os
    import urllib.error
    import urllib.request

    url = os.environ.get("LM_OSV_SERVICE", OSV_SERVICE)

    body = json.dumps({"package": {"name": "pip", "ecosystem": "PyPI"}, "version": "0"}).encode()
    try:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # a fixed https URL
            resp.read(1)
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url} did not answer ({getattr(exc, 'reason', exc)})"


def parse_pip_audit(report: dict) -> list[Advisory]:
    """The advisories in pip-audit's JSON report (`--format json`)."""
    deps = report.get("dependencies", report) if isinstance(report, dict) else report
    return [Advisory(normalize(d["name"]), d.get("version", "?"), v["id"], (v.get("description") or "")[:120],
                     list(v.get("fix_versions") or []))
            for d in deps for v in d.get("vulns") or []]


def run_pip_audit(timeout: int = 600) -> list[Advisory]:
    """pip-audit over this interpreter's environment, against the OSV service; UserError if it
    cannot run."""
    cmd = [sys.executable, "-m", "pip_audit", "--vulnerability-service", "osv", "--format", "json",
           "--progress-spinner", "off"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip-audit did not finish within {timeout} s") from None
    if out.returncode not in (0, 1) or not out.stdout.strip():
        raise UserError(f"pip-audit failed: {(out.stderr or out.stdout).strip()[-300:]}")
    return parse_pip_audit(json.loads(out.stdout))


# ---- code ---------------------------------------------------------------------------------------

@dataclass
class Finding:
    id: str
    severity: str
    file: str
    function: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.function})"


@dataclass
class Waiver:
    id: str
    file: str
    function: str
    reason: str
    date: str

    def key(self) -> tuple[str, str, str]:
        return self.id, self.file, self.function


@dataclass
class CodeScan:
    failing: list[Finding]  # medium or high, not waived
    waived: list[tuple[Finding, Waiver]]
    stale: list[Waiver]  # waivers that no finding matches any more
    low: list[Finding]


def enclosing_function(source: str, line: int) -> str:
    """The dotted name of the innermost def or class holding `line` ("<module>" at top level)."""
    best: list[str] = []

    def visit(node, path):
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.lineno <= line <= (child.end_lineno or child.lineno):
                    best = path + [child.name]
                    visit(child, best)
            else:
                visit(child, path)

    visit(ast.parse(source), [])
    return ".".join(best) or "<module>"


def load_waivers(path: Path) -> list[Waiver]:
    import yaml

    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of waivers (- id: B..., file, function, reason, date)")
    waivers = []
    for i, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "file", "function", "reason", "date") if not (entry or {}).get(k)]
        if missing:
            raise UserError(f"{path}: waiver {i} lacks {', '.join(missing)}; each needs id, file, function, "
                            "reason and date")
        waivers.append(Waiver(str(entry["id"]), str(entry["file"]), str(entry["function"]),
                              str(entry["reason"]).strip(), str(entry["date"])))
    return waivers


def bandit(paths: list[Path], root: Path) -> list[Finding]:
    """bandit's findings over `paths` (every severity; `# nosec` comments ignored, since waivers
    live in one reviewed file), each named by the function that holds it."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"--security.code: no such path: {', '.join(missing)}")
    cmd = [sys.executable, "-m", "bandit", "-r", *map(str, paths), "-f", "json", "-q", "--ignore-nosec"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise UserError(f"bandit failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-300:]}") from None
    if report.get("errors"):
        raise UserError("bandit could not read: " + "; ".join(f"{e['filename']}: {e['reason']}"
                                                               for e in report["errors"]))
    sources: dict[str, str] = {}
    found = []
    for r in report["results"]:
        path = Path(r["filename"])
        path = path if path.is_absolute() else root / path
        rel = path.resolve().relative_to(root.resolve()).as_posix() if path.resolve().is_relative_to(root.resolve()) \
            else path.as_posix()
        if rel not in sources:
            sources[rel] = path.read_text(encoding="utf-8")
        found.append(Finding(r["test_id"], r["issue_severity"], rel, enclosing_function(sources[rel], r["line_number"]),
                             r["line_number"], r["issue_text"]))
    return found


def triage(findings: list[Finding], waivers: list[Waiver]) -> CodeScan:
    by_key = {w.key(): w for w in waivers}
    used, failing, waived, low = set(), [], [], []
    for f in findings:
        if f.severity == "LOW":
            low.append(f)
            continue
        w = by_key.get((f.id, f.file, f.function))
        if w is None:
            failing.append(f)
        else:
            waived.append((f, w))
            used.add(w.key())
    return CodeScan(failing, waived, [w for w in waivers if w.key() not in used], low)


# ---- model folders ------------------------------------------------------------------------------

@dataclass
class ModelFolderReport:
    folder: Path
    pickle_files: list[str]
    safetensors: bool
    custom_code: list[str]  # the auto_map entries of config.json: code the folder asks to run


def inspect_model_folder(folder: Path) -> ModelFolderReport:
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = sorted(p.relative_to(folder).as_posix() for p in files if p.suffix in PICKLE_SUFFIXES
                     and not p.name.startswith("training_args"))
    custom: list[str] = []
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            auto_map = json.loads(cfg_path.read_text(encoding="utf-8")).get("auto_map") or {}
        except ValueError:
            auto_map = {}
        custom = sorted({str(v if isinstance(v, str) else v[0]).split(".")[0] + ".py" for v in auto_map.values()})
    return ModelFolderReport(folder, pickles, any(p.suffix == ".safetensors" for p in files), custom)


def model_folders_named(root: Path) -> dict[str, str]:
    """Every model.init_from that a YAML preset under configs/ or a run's config.yaml under runs/
    names: value -> where it is named."""
    import yaml

    named: dict[str, str] = {}
    for path in sorted((root / "configs").rglob("*.yaml")) + sorted((root / "runs").glob("*/config.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        value = ((data.get("model") or {}) if isinstance(data, dict) else {}).get("init_from")
        if value:
            named.setdefault(str(value), path.relative_to(root).as_posix())
    return named


def remote_code_uses(root: Path) -> list[str]:
    """Where trust_remote_code is turned on: presets and runs' config.yaml setting it, code passing
    it as a literal True."""
    import yaml

    uses = []
    for path in sorted((root / "configs").rglob("*.yaml")) + sorted((root / "runs").glob("*/config.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and (data.get("model") or {}).get("trust_remote_code"):
            uses.append(f"{path.relative_to(root).as_posix()}: model.trust_remote_code: true")
    for top in ("scripts", "lib", "experiments"):
        for path in sorted((root / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                        isinstance(node.value, ast.Constant) and node.value.value is True:
                    uses.append(f"{path.relative_to(root).as_posix()}:{node.value.lineno}: trust_remote_code=True")
    return uses
