"""Plugin registries (lib/plugins.py): plugins add named parts, each is imported once, and one that
fails to load is reported (warning, audit FAIL, and in the error for a name it would have added),
never a crash of its own."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import run_script, train
from lib import plugins
from lib.errors import UserError
from lib.train.optim import SCHEDULES, OptimConfig, lr_at

CUSTOM = '''
from lib.train.optim import SCHEDULES
from pathlib import Path

Path(__file__).with_suffix(".imports").open("a").write("x")  # counts the imports

@SCHEDULES.register("halving")
def halving(progress, cfg):
    return cfg.lr * 0.5 ** (4 * progress)
'''


@pytest.fixture
def clean_registries(monkeypatch):
    """What a test's plugins register or record is forgotten afterwards."""
    monkeypatch.setattr(SCHEDULES, "_items", dict(SCHEDULES._items))
    monkeypatch.setattr(SCHEDULES, "_sources", dict(SCHEDULES._sources))
    monkeypatch.setattr(plugins, "FAILURES", [])
    monkeypatch.setattr(plugins, "_done", {})


def test_a_plugin_file_adds_a_schedule_once(tmp_path, clean_registries):
    (tmp_path / "custom.py").write_text(CUSTOM)
    report = plugins.load([str(tmp_path / "custom.py")])
    assert report.loaded == {str(tmp_path / "custom.py"): ["schedule:halving"]} and not report.failed
    assert SCHEDULES.source("halving") == str(tmp_path / "custom.py") and SCHEDULES.source("cosine") == "built-in"
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="halving")
    assert [lr_at(s, 5, cfg) for s in range(5)] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert plugins.load([str(tmp_path / "custom.py")]).loaded  # reported again, not imported again
    assert (tmp_path / "custom.imports").read_text() == "x"


def test_plugins_that_fail_are_recorded_and_never_raise(tmp_path, clean_registries):
    broken = {
        "syntax.py": "def oops(:\n",
        "missing_package.py": "import no_such_package_anywhere\n",
        "takes_a_builtin.py": "from lib.train.optim import SCHEDULES\nSCHEDULES.register('cosine', lambda p, c: 0.0)\n",
        "exits.py": "raise SystemExit('no')\n",
    }
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
    report = plugins.load([str(tmp_path / n) for n in broken] + ["no_such_module_xyz", str(tmp_path / "absent.py")])
    errors = {f.source.rsplit("/", 1)[-1]: f.error for f in report.failed}
    assert errors["syntax.py"].startswith("SyntaxError")
    assert errors["missing_package.py"] == "ModuleNotFoundError: No module named 'no_such_package_anywhere'"
    assert errors["takes_a_builtin.py"] == "ValueError: schedule 'cosine' is already registered (by built-in)"
    assert errors["exits.py"] == "SystemExit: no"
    assert errors["no_such_module_xyz"].startswith("ModuleNotFoundError")
    assert errors["absent.py"] == f"FileNotFoundError: no such file {tmp_path / 'absent.py'}"
    assert SCHEDULES.get("cosine", "--optim.schedule") is not None and SCHEDULES.source("cosine") == "built-in"
    with pytest.raises(UserError) as caught:
        SCHEDULES.get("halving", "--optim.schedule")
    message = str(caught.value)
    assert message.startswith("--optim.schedule halving: no such schedule; known: constant, linear, cosine, wsd;")
    assert "missing_package.py failed to load (ModuleNotFoundError" in message


def test_an_installed_entry_point_is_loaded(tmp_path, monkeypatch, clean_registries):
    # an installed distribution as importlib.metadata finds it: a .dist-info folder on sys.path
    dist = tmp_path / "lm_extras-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lm-extras\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lm.plugins]\nextras = lm_extras_schedules\n")
    (tmp_path / "lm_extras_schedules.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    report = plugins.load()
    assert report.loaded == {"entry point extras (lm_extras_schedules)": ["schedule:halving"]}
    assert "halving" in SCHEDULES.names()


def test_train_and_audit_use_plugins_and_report_the_broken_ones(tiny_data, tmp_path, clean_registries):
    (tmp_path / "custom.py").write_text(CUSTOM)
    (tmp_path / "broken.py").write_text("import no_such_package_anywhere\n")
    proc = train(tiny_data, tmp_path, "custom", "--plugins", "custom.py", "broken.py", "--optim.schedule", "halving",
                 "--optim.warmup_steps", "0", "--max_steps", "5", "--log_every", "1", "--eval_every", "0", cwd=tmp_path)
    assert proc.stderr.count("warning: plugin") == 1
    assert f"warning: plugin {tmp_path / 'broken.py'} failed to load: ModuleNotFoundError" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "custom" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["type"] == "train"] == [0.01 * 0.5 ** (4 * s / 4) for s in range(5)]

    # a schedule nothing provides (broken.py might have): refused before anything is written
    proc = train(tiny_data, tmp_path, "refused", "--plugins", "broken.py", "--optim.schedule", "from_broken",
                 check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--optim.schedule from_broken: no such schedule" in proc.stderr and "broken.py failed to load" in proc.stderr
    assert not (tmp_path / "refused").exists()

    proc = run_script("scripts/audit.py", "--checks", "plugins", "--plugins", "custom.py", "broken.py", check=False,
                      cwd=tmp_path)
    assert proc.returncode == 1
    assert f"[PASS] plugin {tmp_path / 'custom.py'}: adds schedule:halving" in proc.stdout
    assert f"[FAIL] plugin {tmp_path / 'broken.py'} failed to load: ModuleNotFoundError" in proc.stdout
    assert f"[INFO] schedule: constant, linear, cosine, wsd, halving ({tmp_path / 'custom.py'})" in proc.stdout


HTML_READER = '''
import html, re
from lib.data.sources import READERS

@READERS.register(".html")
def read_html(path):
    text = path.read_text(encoding="utf-8")
    if "<broken" in text:
        raise ValueError("unclosed tag")
    yield None, html.unescape(re.sub(r"<[^>]+>", "", text))
'''


def test_a_reader_plugin_adds_a_kind_of_input_file(tmp_path, monkeypatch, clean_registries):
    from lib.data.sources import READERS, RecordReader, expand_inputs

    monkeypatch.setattr(READERS, "_items", dict(READERS._items))
    monkeypatch.setattr(READERS, "_sources", dict(READERS._sources))
    (tmp_path / "html_reader.py").write_text(HTML_READER)
    (tmp_path / "takes_jsonl.py").write_text("from lib.data.sources import READERS\nREADERS.register('.jsonl', print)\n")
    report = plugins.load([str(tmp_path / "html_reader.py"), str(tmp_path / "takes_jsonl.py")])
    assert report.failed[0].error == "ValueError: reader '.jsonl' is already registered (by built-in)"
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "a.html").write_text("<p>Fish &amp; chips</p>")
    (pages / "b.txt").write_text("plain text")
    (pages / "c.html").write_text("<broken")
    (pages / "d.csv").write_text("not read: no reader for .csv")
    files = expand_inputs(str(pages))  # a folder: every suffix some reader takes
    assert [f.rel for f in files] == ["a.html", "b.txt", "c.html"]
    reader = RecordReader(on_bad_record="skip")
    assert [(r.id, r.text) for f in files for r in reader.read(f)] == [("a.html", "Fish & chips"), ("b.txt", "plain text")]
    assert reader.counts == {"reader_failed": 1}
    with pytest.raises(UserError) as caught:
        list(RecordReader().read(files[2]))
    assert str(caught.value).startswith(f"{pages / 'c.html'}: the .html reader ({tmp_path / 'html_reader.py'}) failed: "
                                        "ValueError: unclosed tag")


def test_tokenize_reads_a_folder_through_a_reader_plugin(tmp_path):
    (tmp_path / "html_reader.py").write_text(HTML_READER)
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(12):
        (pages / f"p{i:02d}.html").write_text(f"<p>Page {i}: fish &amp; chips, {'and more words ' * i}</p>")
    run_script("scripts/tokenize.py", "--plugins", "html_reader.py", "--corpus.source", "pages", "--out_dir", "data",
               "--tokenizer.vocab_size", "300", "--corpus.val_per_mille", "100", cwd=tmp_path)
    from lib.data.corpus import iter_records

    texts = [r["text"] for split in ("train", "val") for r in iter_records(tmp_path / "data" / "corpus", split)]
    assert len(texts) == 12 and all(t.startswith("Page ") and "fish & chips" in t for t in texts)


@dataclasses.dataclass
class Section:
    name: str = "a"


@dataclasses.dataclass
class Cfg:
    part: Section = dataclasses.field(default_factory=Section)


@dataclasses.dataclass
class BOptions:
    weight: float = 0.5


@dataclasses.dataclass
class COptions:
    weight: int = 2


def test_entry_options_widen_a_config_section_and_must_agree_on_type():
    """A registry entry's options dataclass becomes fields of the section the registry serves
    (train.py's --loss.*, --optim.*, --actions.*); a field two entries declare must agree."""
    from lib import config as config_lib

    registry = plugins.Registry("test part")
    try:
        assert plugins.extend_config(Cfg, {"part": registry}) is Cfg  # nothing to add
        registry.register("b", object(), options=BOptions)
        wide = plugins.extend_config(Cfg, {"part": registry})
        cfg = config_lib.parse(wide, ["--part.name", "b", "--part.weight", "0.25"], presets=False)
        assert cfg.part.name == "b" and cfg.part.weight == 0.25 and wide().part.weight == 0.5
        assert config_lib.to_dict(cfg) == {"part": {"name": "b", "weight": 0.25}}
        registry.register("c", object(), options=COptions)
        with pytest.raises(UserError, match="option part.weight is <class 'int'>, but another entry declares it"):
            plugins.extend_config(Cfg, {"part": registry})
    finally:
        plugins.REGISTRIES.pop("test part", None)


def test_plugins_named_before_parsing_come_from_flags_and_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("plugins: [a.py]\n")
    argv = ["--config", str(preset), "--plugins", "b.py", "mod_c", "--seed", "1", "--plugins=d.py"]
    assert plugins.from_command_line(argv) == ["a.py", "b.py", "mod_c", "d.py"]
    assert plugins.from_command_line(["--seed", "1"]) == []


def test_the_readme_plugins_work_as_printed(tiny_data, tmp_path):
    """The README's loss, periodic action and optimizer plugins: each code block saved as the file
    its first line names, and its command run in bash as printed (on the test data, shorter)."""
    import json
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    for name in ("scripts", "lib", "configs", "experiments"):
        (tmp_path / name).symlink_to(REPO / name)
    commands = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        if re.match(r"# (watch|sgd)\.py: python scripts/train\.py", first):
            file, command = first[2:].split(": ", 1)
            (tmp_path / file).write_text(block)
            commands[file] = command
    commands["zloss"] = next(c for b in re.findall(r"```bash\n(.*?)```", text, re.S) for c in b.splitlines()
                             if "--loss.name zloss" in c and c.startswith("python scripts/train.py"))
    assert sorted(commands) == ["sgd.py", "watch.py", "zloss"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    for name, command in commands.items():
        run = tmp_path / "runs" / name.split(".")[0]
        extra = (f" --data.dir {tiny_data} --runs_dir {run.parent} --run_name {run.name} --tracking.no_mlflow "
                 "--max_steps 60 --log_every 10 --eval_every 0 --checkpoint_every 0 --eval_tokens 2000")
        proc = subprocess.run(["bash", "-c", command + extra], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r["type"] == "train"]
        assert losses[-1] < losses[0], (name, losses)  # it trained
        saved = (run / "config.yaml").read_text()
        if name == "watch.py":
            watched = [r for r in rows if r["type"] == "watch"]
            assert [r["step"] for r in watched] == [50] and watched[0]["weight_norm"] > 0
            assert "step 50: weight norm" in proc.stdout and "watch_every: 50" in saved
        elif name == "sgd.py":
            assert "name: sgd" in saved and "momentum: 0.9" in saved
        else:
            assert "name: zloss" in saved and "z: 0.0001" in saved
