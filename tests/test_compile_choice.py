"""A budgeted run compiles only where the budget repays it: the first eager steps are timed, the
decision reads this machine's record of compiling the same model, and a run without a record
compiles and writes one (lib/train/compile_choice.py)."""
from __future__ import annotations

import json

import pytest

from conftest import train
from lib.train import compile_choice
from lib.train.compile_choice import PROBE_STEPS, CompileChoice


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return compile_choice.cache_file()


class Clock:
    """A stand-in for budget.StepClock with its steady step time set by the test."""

    def __init__(self, ready=False, step_seconds=0.0):
        self.ready, self.step_seconds = ready, step_seconds


def drive(choice, times, seconds_left, clock):
    """Feed step times to `choice`; returns the models called at each step and the switch steps."""
    called, switched = [], []
    for i, t in enumerate(times):
        called.append(choice.model)
        if choice.after_step(t, seconds_left, clock):
            switched.append(i + 1)
    return called, switched


def test_compiling_pays_when_the_budget_left_repays_its_cost():
    record = {"compile_s": 40.0, "eager_step_s": 0.13, "compiled_step_s": 0.10}  # 23% less per step
    assert compile_choice.pays(record, 480.0)[0]  # 8 minutes: saves ~110 s
    go, why = compile_choice.pays(record, 120.0)  # 2 minutes: saves ~28 s < 40 s
    assert not go and "took 40 s" in why and "1.30x" in why and "less than it costs" in why
    assert not compile_choice.pays({**record, "compiled_step_s": 0.14}, 1e6)[0]  # never faster


def test_without_a_record_it_compiles_measures_and_records(cache):
    said = []
    choice = CompileChoice("eager", "compiled", "k", "m", probe=True, say=said.append)
    clock = Clock()
    # three eager steps (the first slower), then the compiling step (30 s), then steady 0.1 s steps
    called, switched = drive(choice, [0.5, 0.2, 0.21], 600.0, clock)
    assert called == ["eager"] * PROBE_STEPS and switched == [PROBE_STEPS] and "compile: used" in said[0]
    called, _ = drive(choice, [30.1, 0.1], 600.0, clock)
    assert called == ["compiled"] * 2 and not cache.exists()  # not measured yet: the clock is not ready
    clock.ready, clock.step_seconds = True, 0.1
    drive(choice, [0.1], 600.0, clock)
    record = json.loads(cache.read_text())["k"]
    assert record["compile_s"] == pytest.approx(30.0) and record["eager_step_s"] == pytest.approx(0.2)
    assert record["compiled_step_s"] == pytest.approx(0.1) and choice.model == "compiled"
    assert "took 30 s" in said[-1] and "2.00x" in said[-1]


def test_a_record_that_does_not_pay_keeps_the_run_eager(cache):
    compile_choice.write_record("k", machine="m", compile_s=100.0, eager_step_s=0.2, compiled_step_s=0.1)
    said = []
    choice = CompileChoice("eager", "compiled", "k", "m", probe=True, say=said.append)
    called, switched = drive(choice, [0.5, 0.2, 0.2, 0.2, 0.2], 150.0, Clock())  # saves 75 s < 100 s
    assert called == ["eager"] * 5 and switched == [] and said[0].startswith("compile: not used: ")
    # with more budget left the same record says compile
    choice = CompileChoice("eager", "compiled", "k", "m", probe=True, say=said.append)
    _, switched = drive(choice, [0.5, 0.2, 0.2], 600.0, Clock())
    assert switched == [PROBE_STEPS] and choice.model == "compiled" and said[-1].startswith("compile: used: ")


def key(params: int, precision: str = "bf16", rows: int = 16) -> str:
    return compile_choice.model_key({"params": params, "precision": precision, "rows": rows, "seq": 256})


def test_a_model_never_compiled_here_is_judged_by_the_nearest_in_this_precision(cache):
    # a tiny model gains little; the larger one nearest in size gains more; fp32 and another machine don't count
    compile_choice.write_record(key(90_000), machine="m", compile_s=20.0, eager_step_s=0.02, compiled_step_s=0.019)
    compile_choice.write_record(key(2_500_000), machine="m", compile_s=30.0, eager_step_s=0.2, compiled_step_s=0.16)
    compile_choice.write_record(key(2_000_000, "fp32"), machine="m", compile_s=5.0, eager_step_s=0.2,
                                compiled_step_s=0.01)
    compile_choice.write_record(key(2_000_000), machine="other", compile_s=1.0, eager_step_s=0.2, compiled_step_s=0.01)
    record, source = compile_choice.estimate(key(2_100_000), "m")
    assert record["compile_s"] == 30.0 and record["compiled_step_s"] / record["eager_step_s"] == pytest.approx(0.8)
    assert "nearest model on this machine in this precision (2500000 parameters, 16 x 256" in source
    said = []
    choice = CompileChoice("eager", "compiled", key(2_100_000), "m", probe=True, say=said.append)
    drive(choice, [0.5, 0.2, 0.2], 120.0, Clock())  # saves 24 s at a 1.25x gain, costs 30 s
    assert choice.model == "eager" and "not measured for this model" in said[0]
    choice = CompileChoice("eager", "compiled", key(2_100_000), "m", probe=True, say=said.append)
    drive(choice, [0.5, 0.2, 0.2], 480.0, Clock())  # 8 minutes: saves 96 s
    assert choice.model == "compiled"
    assert compile_choice.estimate(key(2_100_000), "elsewhere") == (None, "")  # nothing measured there
    assert compile_choice.estimate(key(2_100_000, "fp16"), "m") == (None, "")  # nor in that precision


def test_compiled_steps_no_faster_go_back_to_eager(cache):
    said = []
    choice = CompileChoice("eager", "compiled", "k", "m", probe=True, say=said.append)
    clock = Clock()
    drive(choice, [0.3, 0.1, 0.1, 20.0], 600.0, clock)
    clock.ready, clock.step_seconds = True, 0.12
    _, switched = drive(choice, [0.12], 600.0, clock)
    assert switched == [1] and choice.model == "eager" and "eager steps from here on" in said[-1]
    assert json.loads(cache.read_text())["k"]["compiled_step_s"] == pytest.approx(0.12)  # remembered


def test_without_a_budget_or_compile_nothing_is_probed():
    assert CompileChoice("e", "c", "k", "m", probe=False, say=print).model == "c"
    eager = object()
    assert CompileChoice(eager, eager, "k", "m", probe=True, say=print).model is eager


def test_a_budgeted_compiled_run_records_and_the_next_one_decides(tiny_data, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    # the step cap ends the run; the budget is long enough for a cold compile on a slow machine
    args = ["--max_steps", "40", "--max_minutes", "3", "--fit_schedule", "True", "--compile",
            "--log_every", "5", "--eval_every", "0", "--eval_tokens", "2000", "--checkpoint_every", "0"]
    first = train(tiny_data, tmp_path, "first", *args, env=env)
    assert "compile: used (eager steps take" in first.stdout
    table = json.loads((tmp_path / "cache" / "lm-repo" / "compile.json").read_text())
    (key, record), = table.items()
    assert record["compile_s"] > 0 and record["eager_step_s"] > 0 and record["compiled_step_s"] > 0
    assert "model=LlamaForCausalLM" in key and "precision=" in key
    # the step cap ends the schedule on the clock, at its floor, the compiling step's time included
    rows = [json.loads(x) for x in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["type"] == "train"][-1]
    assert last["step"] == 40 and last["lr"] == pytest.approx(1e-3)
    # the same model with a record whose compile costs more than any 3-minute run saves: eager
    table[key]["compile_s"] = 1000.0
    (tmp_path / "cache" / "lm-repo" / "compile.json").write_text(json.dumps(table))
    second = train(tiny_data, tmp_path, "second", *args, env=env)
    assert "compile: not used: on this machine compiling this model took 1000 s" in second.stdout


def test_a_run_ended_while_measuring_records_the_compile_time_and_the_next_one_decides_by_it(cache):
    said, mine = [], key(1000)
    choice = CompileChoice("eager", "compiled", mine, "m", probe=True, say=said.append)
    drive(choice, [0.5, 0.2, 0.2, 40.2], 60.0, Clock())  # the compiling step eats the short budget
    choice.finish()
    record = json.loads(cache.read_text())[mine]
    assert record["compile_s"] == pytest.approx(40.0) and "compiled_step_s" not in record
    assert "compiling took about 40 s" in said[-1]
    # the next run: no gain measured anywhere, so compiled steps count as free; 30 s left < 40 s
    again = CompileChoice("eager", "compiled", mine, "m", probe=True, say=said.append)
    drive(again, [0.5, 0.2, 0.2], 30.0, Clock())
    assert again.model == "eager" and "counted as free" in said[-1] and "less than it costs" in said[-1]
    # with a similar model's measured gain (1.25x) and 5 minutes left: saves 60 s > 40 s
    compile_choice.write_record(key(1200), machine="m", compile_s=20.0, eager_step_s=0.25, compiled_step_s=0.2)
    compile_choice.write_record(key(1000, "fp32"), machine="m", compile_s=20.0, eager_step_s=0.25,
                                compiled_step_s=0.01)  # another precision: not used
    record, source = compile_choice.estimate(mine, "m")
    assert record["compile_s"] == pytest.approx(40.0) and "gain of the nearest model compiled here (1200" in source
    assert compile_choice.pays(record, 300.0, source)[0] and not compile_choice.pays(record, 150.0, source)[0]
    # a finished measurement is not overwritten by finish()
    done = CompileChoice("eager", "compiled", "k2", "m", probe=True, say=said.append)
    drive(done, [0.5, 0.2, 0.2, 10.1], 600.0, Clock())
    drive(done, [0.1], 600.0, Clock(ready=True, step_seconds=0.1))
    done.finish()
    assert json.loads(cache.read_text())["k2"]["compiled_step_s"] == pytest.approx(0.1)
