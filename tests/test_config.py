"""Config precedence (defaults < YAML < flags) and errors that name the key and the file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from lib import config as config_lib
from lib.errors import ConfigError
from lib.model.build import ModelConfig


@dataclass
class Inner:
    lr: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Outer:
    config: Optional[Path] = None
    name: str = "default"
    steps: int = 10
    flag: bool = False
    width: Optional[int] = None
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write(tmp_path, "steps: 20\nname: from_yaml\ninner:\n  lr: 1e-3\n")
    assert config_lib.parse(Outer, []) == Outer()
    from_yaml = config_lib.parse(Outer, ["--config", str(path)])
    assert (from_yaml.steps, from_yaml.name, from_yaml.inner.lr) == (20, "from_yaml", 1e-3)
    assert from_yaml.inner.schedule == "cosine"  # untouched keys keep their defaults
    both = config_lib.parse(Outer, ["--config", str(path), "--steps", "30", "--inner.schedule", "constant"])
    assert (both.steps, both.name, both.inner.lr, both.inner.schedule) == (30, "from_yaml", 1e-3, "constant")
    assert both.config == path
    # flag order does not matter: --config after the flags still loses to them
    late = config_lib.parse(Outer, ["--steps", "31", f"--config={path}"])
    assert late.steps == 31 and late.name == "from_yaml"


def test_pyyaml_exponent_string_is_a_float(tmp_path):
    # PyYAML loads `1e-3` (no dot) as the string "1e-3"
    cfg = config_lib.parse(Outer, ["--config", str(write(tmp_path, "inner:\n  lr: 1e-3\n"))])
    assert isinstance(cfg.inner.lr, float) and cfg.inner.lr == pytest.approx(0.001)


@pytest.mark.parametrize("text, words", [
    ("stepz: 3\n", ["unknown key 'stepz'", "did you mean 'steps'"]),
    ("inner:\n  lrr: 3\n", ["unknown key 'inner.lrr'"]),
    ("steps: ten\n", ["key 'steps'", "expected an integer"]),
    ("steps: 2.5\n", ["key 'steps'", "expected an integer"]),
    ("flag: 1\n", ["key 'flag'", "true or false"]),
    ("inner:\n  lr: fast\n", ["key 'inner.lr'", "expected a number"]),
    ("inner:\n  schedule: linear\n", ["key 'inner.schedule'", "'cosine', 'constant'"]),
    ("inner: 3\n", ["key 'inner'", "mapping"]),
    ("- a\n- b\n", ["mapping"]),
    ("steps: [1\n", ["line", "not valid YAML"]),
])
def test_yaml_errors_name_key_and_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config_lib.parse(Outer, ["--config", str(path)])
    msg = str(err.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.parse(Outer, ["--config", str(tmp_path / "nope.yaml")])


def test_bad_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        config_lib.parse(Outer, ["--inner.schedule", "linear"])
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        config_lib.parse(Outer, ["--no-such-flag", "1"])
    assert exc.value.code != 0


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.parse(Outer, ["--steps", "7", "--width", "3", "--inner.lr", "0.5"])
    config_lib.save(cfg, tmp_path / "resolved.yaml")
    again = config_lib.parse(Outer, ["--config", str(tmp_path / "resolved.yaml")])
    assert dataclasses.replace(again, config=None) == cfg


def test_null_for_optional(tmp_path):
    cfg = config_lib.parse(Outer, ["--config", str(write(tmp_path, "width: null\n"))])
    assert cfg.width is None
    with pytest.raises(ConfigError, match="key 'width'"):
        config_lib.parse(Outer, ["--config", str(write(tmp_path, "width: wide\n"))])


@dataclass
class _Sized:
    config: Optional[Path] = None
    lr: float = 1.0
    model: ModelConfig = field(default_factory=ModelConfig)


def test_a_model_size_sits_between_the_preset_and_the_flags(tmp_path):
    from lib.model import registry
    from lib.errors import UserError

    preset = write(tmp_path, "lr: 0.5\nmodel:\n  d_model: 64\n  n_layers: 3\n  d_ff: 100\n")
    sizes = {"model.size": registry.size}
    cfg = config_lib.parse(_Sized, ["--config", str(preset), "--model.size", "llama-1b", "--model.n_layers", "2"],
                           expand=sizes)
    assert (cfg.lr, cfg.model.size, cfg.model.d_model, cfg.model.n_heads, cfg.model.n_kv_heads) == (
        0.5, "llama-1b", 2048, 32, 4)
    assert cfg.model.n_layers == 2 and cfg.model.d_ff == 5632 and not cfg.model.tie_embeddings
    in_yaml = write(tmp_path, "model:\n  size: gpt2-124m\n  d_ff: 100\n")  # the size applies over its own file too
    cfg = config_lib.parse(_Sized, ["--config", str(in_yaml)], expand=sizes)
    assert (cfg.model.arch, cfg.model.d_model, cfg.model.max_seq_len, cfg.model.d_ff) == ("gpt2", 768, 1024, None)
    assert config_lib.parse(_Sized, ["--model.n_layers", "5"], expand=sizes).model.n_layers == 5
    with pytest.raises(UserError, match="no such size; sizes: llama-20m"):
        config_lib.parse(_Sized, ["--model.size", "llama-7b"], expand=sizes)


@pytest.mark.parametrize("name,vocab,params", [
    ("llama-1b", 32000, 1_100_048_384),   # TinyLlama-1.1B
    ("llama-135m", 49152, 134_515_008),   # SmolLM2-135M
    ("gpt2-124m", 50257, 124_439_808),    # GPT-2 small
    ("gpt2-355m", 50257, 354_823_168),    # GPT-2 medium
])
def test_named_sizes_have_the_shapes_they_are_named_after(name, vocab, params):
    import torch

    from lib.model.build import ModelConfig, build_model, count_params
    from lib.model.registry import size

    with torch.device("meta"):  # shapes only: no memory for the weights
        model = build_model(ModelConfig(**size(name)), vocab, {"bos": 1, "eos": 2, "pad": 0})
    assert count_params(model) == params


def test_options_since_removed_are_read_from_an_older_config_and_test_aids_are_not_options(tmp_path):
    """A config.yaml written before the test aids left the options (debug_stall: null) still loads;
    --help shows no test aid (they are environment variables: lib/train/faults.py)."""
    from conftest import run_script

    old = tmp_path / "old.yaml"
    old.write_text("max_steps: 7\ndebug_stall: null\ndebug_nan_step: null\n")
    proc = run_script("scripts/train.py", "--config", str(old), "--print_config")
    assert "max_steps: 7" in proc.stdout and "debug" not in proc.stdout
    assert "debug" not in run_script("scripts/train.py", "--help").stdout
