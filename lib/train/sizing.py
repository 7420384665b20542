"""Size a model trained from scratch to the compute its time budget buys on this machine.

A fixed shape suits one speed: on a CPU with a third of the throughput it sees a third of the
tokens for the same parameters, and ends worse than a smaller model would. With
`size_to_budget` (the default preset sets it), train.py measures this machine's matrix-product
rate in the precision it will train in (lib.train.flops, cached), multiplies it by the budget, and takes
from SHAPES the one the budget sweep (experiments/budget-sweep) found best at the nearest compute
(nearest on a log scale). The chosen values are written into the run's config.yaml, with
size_to_budget off, so `--config` on it reproduces the run and a resumed run keeps its shape.

Never sized: a run that fine-tunes (model.init_from), has no time budget, or sets the model's size
on its command line (SIZE_FIELDS: --model.size, --model.d_model, ...). An architecture option
(--model.arch, --model.qk_norm, --model.mlp, ...) keeps the sized shape, and any other sized option
given on the command line (--optim.lr, --micro_batch_size, ...) keeps the value given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lib.train.precision import model_matmul_shapes

# a fixed yardstick: the products of a 4 x 256 model with a 16k output layer on 8 x 256 tokens,
# which precision auto also probes when it has no model's own shapes (one cached figure for both)
REFERENCE = model_matmul_shapes(256, 704, 16384, 2048)


@dataclass(frozen=True)
class Shape:
    """One configuration of the sweep: where it was best, and what it sets."""

    name: str
    gflops: float
    """The reference matmul rate (GFLOP/s) of the sweep machine at the speed where it was best."""
    minutes: float
    """The sweep's training budget."""
    settings: dict
    """Dotted option -> value."""

    @property
    def tflop(self) -> float:
        return self.gflops * 60 * self.minutes / 1e3


# From experiments/budget-sweep/README.md: the best configuration measured at each speed of the
# sweep (9 minutes, the 4k stdlib tokenizer), with that speed's rate on the REFERENCE products.
# The shapes were chosen on transformers' Llama; the own model at its defaults computes the same
# function, and with QK-norm (the preset's) the same shapes gave 1.0563 (full speed, mean of two
# seeds) and 1.1457 (a third of it)
SHAPES = [
    # a third of the speed: 3 layers of 128 (1.206 whole split, lzma passed at 2.7 min) over 4 of 128
    # (1.2123, 2.9), 4 of 96 (1.2427, 2.85) and 16 sequences a step (1.2743, 3.3)
    Shape("muon-128x3", gflops=128, minutes=9, settings={
        "model.d_model": 128, "model.n_layers": 3, "model.n_heads": 2, "optim.name": "muon", "optim.lr": 3e-3}),
    # full speed: 3 layers of 192, 16 sequences a step (1.0812, lzma passed at 1.6 min) over 4 layers
    # (1.0898, 2.2), 8 sequences a step (1.1186), 4 of 128 (1.1152) and 4 of 256 (1.1256)
    Shape("muon-192x3", gflops=392, minutes=9, settings={
        "model.d_model": 192, "model.n_layers": 3, "model.n_heads": 3, "optim.name": "muon", "optim.lr": 3e-3,
        "micro_batch_size": 16}),
]


def choose(gflops: float, minutes: float, shapes: list[Shape] = SHAPES) -> Shape:
    """The shape whose sweep compute is nearest (log scale) to `gflops` for `minutes`."""
    tflop = gflops * 60 * minutes / 1e3
    return min(shapes, key=lambda s: abs(math.log(tflop / s.tflop)))


def measured_gflops(precision: str) -> tuple[float, str]:
    """(GFLOP/s, how): this machine's rate on the REFERENCE products in the dtype a run with
    `precision` computes in (auto: bf16 where it measures clearly faster, as lib.train.precision
    decides), on torch's current thread count; cached by lib.train.flops."""
    from lib.errors import UserError
    from lib.train.flops import ProbeFailed, cpu_throughput
    from lib.train.precision import decide_cpu

    shapes = [list(s) for s in REFERENCE]
    try:
        figures, how = cpu_throughput({"model_fp32": ("fp32", shapes), "model_bf16": ("bf16", shapes)})
    except ProbeFailed as exc:
        raise UserError(f"--size_to_budget needs this machine's matrix-product rate, and the probe gave none ({exc}); "
                        "run again when the machine is quieter, or give the model's shape (--model.*) without "
                        "--size_to_budget") from None
    if precision == "auto":
        dtype = "bf16" if decide_cpu(figures["model_fp32"], figures["model_bf16"])[0] == "bf16" else "fp32"
    else:
        dtype = "fp32" if precision in ("fp32", "fp16") else precision
    return figures[f"model_{dtype}"] / 1e9, f"{dtype}, {how}"


def given_options(argv: list[str]) -> set[str]:
    """The dotted options named on a command line (`--a.b 1`, `--a.b=1`, `--a.no_b`, `--a.b`)."""
    names = set()
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0]
            head, _, leaf = name.rpartition(".")
            names.add(name)
            if leaf.startswith("no_"):
                names.add(f"{head}.{leaf[3:]}" if head else leaf[3:])
    return names


def put(cfg, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


# the model fields that set its size: a command line naming one gets the model it asks for
SIZE_FIELDS = ("model.size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff")


def why_not(cfg, argv: list[str]) -> str | None:
    """Why this run is not sized (None: it is)."""
    if not cfg.size_to_budget:
        return "off"
    if cfg.model.init_from:
        return "the model comes from model.init_from"
    if not cfg.max_minutes:
        return "no time budget (--max_minutes)"
    named = sorted(n for n in given_options(argv) if n in SIZE_FIELDS)
    if named:
        return f"the command line sets the model ({', '.join('--' + n for n in named)})"
    return None


def apply(cfg, shape: Shape, argv: list[str]) -> dict:
    """Set `shape`'s settings on `cfg`, except options given on the command line; turn
    size_to_budget off (what config.yaml then records). Returns what was set."""
    given = given_options(argv)
    chosen = {k: v for k, v in shape.settings.items() if k not in given}
    for k, v in chosen.items():
        put(cfg, k, v)
    cfg.size_to_budget = False
    return chosen


def restore(cfg, saved: dict) -> dict:
    """Take the sized options' values from a run's saved config.yaml (`saved`, as loaded): a
    resumed run keeps the shape it started with. Returns what was taken."""
    taken = {}
    for shape in SHAPES:
        for k in shape.settings:
            if k in taken:
                continue
            node = saved
            for part in k.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                taken[k] = node
    for k, v in taken.items():
        put(cfg, k, v)
    cfg.size_to_budget = False
    return taken


def size_run(cfg, argv: list[str], state) -> str | None:
    """Size `cfg` (in place) for this run, every process the same (`state`: Accelerate's
    PartialState; the main process measures). Returns the start-up line, or None when the run is
    not sized because size_to_budget is off."""
    from lib.records import checkpoint as ckpt
    from lib import config as config_lib
    from lib.train.distributed import broadcast_from_main

    reason = why_not(cfg, argv)
    if reason == "off":
        return None
    if reason:
        cfg.size_to_budget = False
        return f"size_to_budget: not applied, {reason}"
    run_dir = cfg.runs_dir / cfg.run_name
    if cfg.resume and not cfg.overwrite and (run_dir / "config.yaml").is_file() and (
            ckpt.complete_checkpoints(run_dir) or ckpt.archived_checkpoints(run_dir)):
        taken = restore(cfg, config_lib.load_yaml(run_dir / "config.yaml"))
        return f"size_to_budget: a resumed run keeps its shape ({_listing(taken)}, from {run_dir / 'config.yaml'})"
    import torch

    if torch.cuda.is_available():
        measured = (math.inf, "a CUDA GPU")
    else:
        measured = measured_gflops(cfg.precision) if state.is_main_process else None
    gflops, how = broadcast_from_main(measured, state)
    world = state.num_processes
    total = gflops * world
    shape = choose(total, cfg.max_minutes)
    chosen = apply(cfg, shape, argv)
    speed = "a CUDA GPU" if math.isinf(total) else (
        f"{gflops:,.0f} GFLOP/s on the reference matmuls ({how})" + (f" x {world} processes" if world > 1 else ""))
    kept = sorted(set(shape.settings) - set(chosen))
    return (f"size_to_budget: {speed}; {cfg.max_minutes:g} minutes buy "
            + ("unbounded compute" if math.isinf(total) else f"{total * 60 * cfg.max_minutes / 1e3:,.0f} TFLOP")
            + f" -> {shape.name} (best in the budget sweep at {shape.tflop:,.0f} TFLOP): {_listing(chosen)}"
            + (f"; kept from the command line: {', '.join('--' + k for k in kept)}" if kept else ""))


def _listing(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "nothing"
