"""audit.py --checks security: installed packages against a local OSV database (and an honest
warning without one), bandit over the code with a waivers file, and model folders with pickle
weights or custom code."""
from __future__ import annotations

import json
import zipfile
from importlib import metadata

import pytest
from packaging.version import Version

from conftest import run_script
from lib.audit import security


def osv(id_, name, **affected):
    return {"id": id_, "summary": f"test advisory {id_}",
            "affected": [{"package": {"ecosystem": affected.pop("ecosystem", "PyPI"), "name": name}, **affected}]}


def fixed_range(introduced, fixed):
    return [{"type": "ECOSYSTEM", "events": [{"introduced": introduced}, {"fixed": fixed}]}]


@pytest.fixture
def osv_folder(tmp_path):
    tqdm, yaml_v = metadata.version("tqdm"), metadata.version("PyYAML")
    records = [
        osv("TEST-1", "tqdm", ranges=fixed_range("0", "999.0")),          # flags the installed tqdm
        osv("TEST-2", "pyyaml", versions=[yaml_v]),                          # by explicit version, name normalized
        osv("TEST-3", "tqdm", ranges=fixed_range("0", "0.0.1")),           # fixed long before: not flagged
        {**osv("TEST-4", "tqdm", ranges=fixed_range("0", "999.0")), "withdrawn": "2026-01-01T00:00:00Z"},
        osv("TEST-5", "tqdm", ecosystem="npm", ranges=fixed_range("0", "999.0")),
        osv("TEST-6", "no-such-package-here", ranges=fixed_range("0", "999.0")),
    ]
    db = tmp_path / "osv"
    (db / "PyPI").mkdir(parents=True)
    for r in records:
        (db / "PyPI" / f"{r['id']}.json").write_text(json.dumps(r))
    return db, tqdm


def test_range_semantics():
    ev = [{"introduced": "1.0"}, {"fixed": "1.5"}, {"introduced": "2.0"}, {"last_affected": "2.3"}]
    inside = [Version(v) for v in ("1.0", "1.4.9", "2.0", "2.3")]
    outside = [Version(v) for v in ("0.9", "1.5", "1.9", "2.3.1", "3.0")]
    assert all(security._in_range(v, ev) for v in inside)
    assert not any(security._in_range(v, ev) for v in outside)


def test_dependency_scan_flags_the_installed_version_from_a_folder_and_an_archive(osv_folder, tmp_path):
    db, tqdm = osv_folder
    archive = tmp_path / "osv.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in (db / "PyPI").glob("*.json"):
            zf.write(p, p.name)
    for where in (db, archive):
        proc = run_script("scripts/audit.py", "--checks", "security", "--security.parts", "deps",
                          "--security.db", str(where), check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        failing = [ln for ln in proc.stdout.splitlines() if "[FAIL]" in ln]
        assert any(f"tqdm {tqdm}: TEST-1" in ln and "fixed in 999.0" in ln for ln in failing), proc.stdout
        assert any("pyyaml" in ln and "TEST-2" in ln for ln in failing), proc.stdout
        assert not any(t in proc.stdout for t in ("TEST-3", "TEST-4", "TEST-5", "TEST-6")), proc.stdout
        assert "matched against 5 PyPI advisories" in proc.stdout  # the npm one is not PyPI's


def test_without_a_database_nothing_is_claimed_and_strict_fails(tmp_path, monkeypatch):
    # an address that cannot answer stands in for this offline machine's view of the OSV service
    args = ("scripts/audit.py", "--checks", "security", "--security.parts", "deps")
    env = {"LM_OSV_SERVICE": "http://127.0.0.1:9/v1/query"}
    proc = run_script(*args, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARN] dependencies NOT checked" in proc.stdout and "--security.db" in proc.stdout
    assert "no known vulnerabilities" not in proc.stdout
    strict = run_script(*args, "--strict", check=False, env=env)
    assert strict.returncode == 1 and "[FAIL] dependencies NOT checked" in strict.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(*args, "--security.db", str(empty), "--strict", check=False)
    assert proc.returncode == 1 and "holds no PyPI advisories" in proc.stdout
    proc = run_script(*args, "--security.db", str(tmp_path / "missing"), check=False)
    assert proc.returncode != 0 and "--security.db" in proc.stderr and "Traceback" not in proc.stderr


def test_pip_audit_report_is_read():
    report = {"dependencies": [{"name": "Foo_Bar", "version": "1.0", "vulns": [
        {"id": "PYSEC-1", "fix_versions": ["1.1"], "description": "bad"}]}, {"name": "ok", "version": "2", "vulns": []}]}
    (adv,) = security.parse_pip_audit(report)
    assert (adv.package, adv.version, adv.id, adv.fixed) == ("foo-bar", "1.0", "PYSEC-1", ["1.1"])


BAD = '''import pickle


def load(blob):
    return pickle.loads(blob)


class Box:
    def open(self, text):
        return eval(text)
'''


def test_code_scan_fails_unwaived_findings_and_reports_stale_waivers(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "bad.py").write_text(BAD)
    waivers = tmp_path / "waivers.yaml"
    args = ("scripts/audit.py", "--checks", "security", "--security.parts", "code", "--security.code", str(code),
            "--security.waivers", str(waivers))
    proc = run_script(*args, check=False)
    assert proc.returncode == 1
    failing = [ln for ln in proc.stdout.splitlines() if "[FAIL]" in ln]
    assert any("B301" in ln and "bad.py:5 (load)" in ln for ln in failing), proc.stdout
    assert any("B307" in ln and "bad.py:10 (Box.open)" in ln for ln in failing), proc.stdout
    assert "low-severity" in proc.stdout  # B403, import pickle

    bad = (code / "bad.py").as_posix()
    waivers.write_text(f"""
- {{id: B301, file: {bad}, function: load, reason: trusted blobs only, date: 2026-12-03}}
- {{id: B307, file: {bad}, function: Box.open, reason: test input, date: 2026-12-03}}
- {{id: B307, file: {bad}, function: gone, reason: was removed, date: 2026-12-01}}
""")
    proc = run_script(*args, check=False)
    assert proc.returncode == 0, proc.stdout
    assert "0 medium/high finding(s) not waived, 2 waived" in proc.stdout
    assert "[WARN] stale waiver" in proc.stdout and "(gone)" in proc.stdout
    assert run_script(*args, "--strict", check=False).returncode == 1

    waivers.write_text(f"- {{id: B301, file: {bad}, function: load, date: 2026-12-03}}\n")
    proc = run_script(*args, check=False)
    assert proc.returncode != 0 and f"{waivers}: waiver 1 lacks reason" in proc.stderr


def test_repository_code_passes_strictly_with_its_waivers():
    proc = run_script("scripts/audit.py", "--checks", "security", "--security.parts", "code", "--strict", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 medium/high finding(s) not waived" in proc.stdout and "stale" not in proc.stdout


def test_model_folder_with_pickle_weights_and_custom_code_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_x.XModel"}}))
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    args = ("scripts/audit.py", "--checks", "security", "--security.parts", "models", "--security.models", str(folder))
    proc = run_script(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warn = [ln for ln in proc.stdout.splitlines() if "[WARN]" in ln]
    assert any("pytorch_model.bin" in ln and "safetensors" in ln for ln in warn), proc.stdout
    assert "modeling_x.py" in proc.stdout and "trust_remote_code" in proc.stdout
    assert run_script(*args, "--strict", check=False).returncode == 1
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"x")
    proc = run_script(*args, "--strict", check=False)
    assert proc.returncode == 0 and "no pickle-format weights" in proc.stdout
