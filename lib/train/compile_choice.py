"""Whether torch.compile pays for itself within a run's time budget, decided by measurement.

Compiling costs time once (tens of seconds on a CPU, more for a LoRA-wrapped model) and then
makes each step faster by a factor that depends on the model and the machine: a 9-minute
pretraining run gains minutes, a 3-minute fine-tune can lose a third of its budget. So a budgeted
run of one process that asks for compilation (`--compile`, with `--max_minutes`) first runs
PROBE_STEPS steps eagerly and times them, then:

- if this machine has compiled the same model before (a record in the cache file, keyed by the
  model, batch, precision, threads, torch version and CPU), it compiles only when the budget left
  repays the recorded compile time: (seconds left) x (1 - compiled step / eager step) > compile
  seconds;
- without one, it judges by the model nearest in size compiled on this machine (the same torch,
  threads, CPU and oneDNN instruction limit) in the same precision; with no such record it
  compiles as asked.
When it compiles, it measures for the next run: the eager step time, the compiled step time, and
the compile time (the first compiled step less a compiled step). A run that ends before its
compiled steps are timed (compiling took most of a short budget) still records the compile time,
bounded by the first compiled step less an eager one; the next run then takes the gain from the
other models measured here, or, with none, assumes compiled steps cost nothing, so it compiles only
when the budget left is longer than compiling alone takes.

Either way, once compiled steps are timed and found no faster than the eager ones, the rest of the
run goes back to eager steps. The compile time is inside the budget in every case (the schedule is
fitted after it).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

PROBE_STEPS = 3  # eager steps timed before the decision (the first also warms allocations up)


def cache_file() -> Path:
    from lib.train.flops import cache_dir

    return cache_dir() / "compile.json"


def model_key(parts: dict) -> str:
    """One cache key from what makes a compiled graph and its speed (sorted `name=value` pairs)."""
    return " ".join(f"{k}={parts[k]}" for k in sorted(parts))


MEASURED = ("compile_s", "eager_step_s", "compiled_step_s")


def read_table() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def parse_key(key: str) -> dict:
    """model_key's pairs back as a dict (values as strings)."""
    return dict(part.split("=", 1) for part in key.split() if "=" in part)


def _size(parts: dict) -> float:
    """What a step of the keyed model computes on, roughly: parameters x sequences x length."""
    try:
        return float(parts["params"]) * float(parts["rows"]) * float(parts["seq"])
    except (KeyError, ValueError):
        return 0.0


def nearest(key: str, machine: str, table: dict) -> tuple[str, dict] | None:
    """The complete record of another model compiled on `machine` in the same precision whose
    step is nearest in size to `key`'s (log scale), or None."""
    mine = parse_key(key)
    alike = [(k, r) for k, r in table.items()
             if k != key and r.get("machine") == machine and all(r.get(m) for m in MEASURED)
             and parse_key(k).get("precision") == mine.get("precision")]
    if not alike or not _size(mine):
        return None
    return min(alike, key=lambda kr: abs(math.log(max(_size(parse_key(kr[0])), 1.0) / _size(mine))))


def estimate(key: str, machine: str) -> tuple[dict | None, str]:
    """(a record to decide by, where it comes from): this model's own; else the nearest model in
    size compiled on the same `machine` in the same precision (a tiny model's small gain says
    little about a large one's, and fp32 nothing about bf16); else None. An own record with no
    compiled step time (its run ended first) takes the gain of that nearest model, or a free
    compiled step where there is none."""
    table = read_table()
    own = table.get(key, {})
    if all(own.get(k) for k in MEASURED):
        return own, "on this machine compiling this model"
    near = nearest(key, machine, table)
    ratio = near[1]["compiled_step_s"] / near[1]["eager_step_s"] if near else 0.0
    if own.get("compile_s") and own.get("eager_step_s"):
        gain = (f"at the gain of the nearest model compiled here ({parse_key(near[0]).get('params')} parameters)"
                if near else "its compiled steps were never timed here: counted as free")
        return ({"compile_s": own["compile_s"], "eager_step_s": 1.0, "compiled_step_s": ratio},
                f"on this machine compiling this model ({gain})")
    if near is None:
        return None, ""
    return ({"compile_s": near[1]["compile_s"], "eager_step_s": 1.0, "compiled_step_s": ratio},
            f"not measured for this model; compiling the nearest model on this machine in this precision "
            f"({parse_key(near[0]).get('params')} parameters, {parse_key(near[0]).get('rows')} x "
            f"{parse_key(near[0]).get('seq')} tokens a step)")


def write_record(key: str, **fields) -> None:
    """Merge `fields` into the record of `key` (a cache that cannot be written is skipped: the
    next run measures again)."""
    path = cache_file()
    table = read_table()
    table[key] = {**table.get(key, {}), **fields, "date": time.strftime("%Y-%m-%d")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def pays(record: dict, seconds_left: float, source: str = "on this machine compiling this model") -> tuple[bool, str]:
    """(compile or not, why) from an earlier measurement (`source` says whose)."""
    c, e, s = record["compile_s"], record["eager_step_s"], record["compiled_step_s"]
    saving = seconds_left * (1 - s / e)
    verdict = saving > c
    speed = f"made a step {e / s:.2f}x as fast" if s > 0 else "saves every step's time at most"
    return verdict, (f"{source} took {c:.0f} s and {speed}; "
                     f"over the {seconds_left / 60:.1f} minutes left that saves about {max(saving, 0):.0f} s, "
                     f"{'more' if verdict else 'less'} than it costs")


class CompileChoice:
    """Which model the loop calls at each step, eager or compiled, and the measurements behind it.

    `after_step(step_seconds, seconds_left, clock)` after every optimizer step returns True when
    the loop switched models and its step clock must start over (the next step's time is not a
    steady one)."""

    def __init__(self, eager, compiled, key: str, machine: str, probe: bool, say: Callable[[str], None]):
        self.eager, self.compiled, self.key, self.machine, self.say = eager, compiled, key, machine, say
        if compiled is eager:
            self.phase = "eager"
        else:
            self.phase = "probe" if probe else "compiled"
        self.probe_times: list[float] = []
        self.eager_step_s = None
        self.first_compiled_s = None

    @property
    def model(self):
        return self.compiled if self.phase in ("measure", "compiled") else self.eager

    def after_step(self, step_seconds: float, seconds_left: float, clock) -> bool:
        if self.phase == "probe":
            self.probe_times.append(step_seconds)
            if len(self.probe_times) < PROBE_STEPS:
                return False
            self.eager_step_s = min(self.probe_times[1:])
            record, source = estimate(self.key, self.machine)
            if record:
                go, why = pays(record, seconds_left, source)
                if not go:
                    self.phase = "eager"
                    self.say(f"compile: not used: {why}")
                    write_record(self.key, machine=self.machine, eager_step_s=round(self.eager_step_s, 4))
                    return False
                self.say(f"compile: used: {why}")
            else:
                self.say(f"compile: used (eager steps take {self.eager_step_s:.3f} s; this run measures what "
                         "compiling costs and gains here, and the next run of this model decides by it)")
            self.phase = "measure"
            return True
        if self.phase == "measure":
            if self.first_compiled_s is None:
                self.first_compiled_s = step_seconds
                return False
            if not clock.ready:
                return False
            s, e = clock.step_seconds, self.eager_step_s
            c = max(self.first_compiled_s - s, 0.0)
            write_record(self.key, machine=self.machine, compile_s=round(c, 2), eager_step_s=round(e, 4),
                         compiled_step_s=round(s, 4))
            if s >= e:
                self.phase = "eager"
                self.say(f"compile: compiled steps take {s:.3f} s, eager ones {e:.3f} s: eager steps from here on "
                         f"(compiling took {c:.0f} s)")
                return True
            self.phase = "compiled"
            self.say(f"compile: took {c:.0f} s; a step takes {s:.3f} s compiled, {e:.3f} s eager ({e / s:.2f}x)")
        return False

    def finish(self) -> None:
        """At the end of the loop: a run still measuring (its budget ended before compiled steps
        were timed) records what it learned, so the next short run does not compile blindly."""
        if self.phase != "measure" or self.first_compiled_s is None:
            return
        c = max(self.first_compiled_s - self.eager_step_s, 0.0)
        write_record(self.key, machine=self.machine, compile_s=round(c, 2), eager_step_s=round(self.eager_step_s, 4))
        self.say(f"compile: the run ended before compiled steps were timed; compiling took about {c:.0f} s "
                 "(recorded for the next run of this model)")
