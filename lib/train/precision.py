"""Which precision to compute in: `--precision auto`, decided by measurement on CPUs.

On a CUDA GPU, bf16 autocast where the GPU supports it, else fp16 with a loss scaler. On a CPU
no flag tells whether bf16 is fast: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is True on
any AVX-512 CPU, including those that emulate bf16 (no AVX512-BF16 or AMX units), where bf16
matmuls ran 3-5x slower than fp32. So auto times matrix products of the model's own shapes (its
projections and output layer, at its micro-batch of tokens) in both dtypes, on the run's
threads, and takes bf16 only where it is clearly faster. The figures are cached (lib.train.flops).
"""
from __future__ import annotations

from dataclasses import dataclass

# bf16 must beat fp32 by this factor on the model's matmuls: autocast adds casts and the rest of
# a step (norms, softmax, optimizer) does not speed up, so a small matmul gain is lost in training.
BF16_MIN_SPEEDUP = 1.5
MAX_PROBE_ROWS = 4096  # rows (tokens) of the probed products: larger ones only take longer


@dataclass
class Choice:
    """A resolved precision: Accelerate's mixed_precision value and the reason, for the log."""

    mixed_precision: str  # "no" | "bf16" | "fp16"
    reason: str

    @property
    def name(self) -> str:
        """fp32 | bf16 | fp16, as a person reads it."""
        return {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)


def model_matmul_shapes(hidden: int, intermediate: int, vocab: int, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the products one forward pass of a transformer layer stack and its output
    layer makes on `tokens` rows: attention projection, MLP up and down, output layer."""
    m = max(1, min(tokens, MAX_PROBE_ROWS))
    return [(m, hidden, hidden), (m, hidden, intermediate), (m, intermediate, hidden), (m, hidden, vocab)]


def shapes_of(model_config, tokens: int) -> list[tuple[int, int, int]]:
    """model_matmul_shapes for a Hugging Face config (Llama- or GPT-2-style)."""
    from lib.model.build import config_dims

    return model_matmul_shapes(*config_dims(model_config), tokens)


def decide_cpu(fp32: float, bf16: float) -> tuple[str, str]:
    """('bf16' | 'no', reason) from the two measured throughputs (FLOP/s) on the model's shapes."""
    ratio = bf16 / max(fp32, 1.0)
    figures = f"bf16 {bf16 / 1e9:,.0f} vs fp32 {fp32 / 1e9:,.0f} GFLOP/s on the model's matmuls, {ratio:.2f}x"
    if ratio >= BF16_MIN_SPEEDUP:
        return "bf16", f"{figures}: bf16 is clearly faster here"
    return "no", f"{figures}: bf16 is not clearly faster here (needs {BF16_MIN_SPEEDUP}x), fp32"


def resolve(choice: str, shapes: list[tuple[int, int, int]] | None = None, cuda: bool | None = None,
            refresh: bool = False) -> Choice:
    """Resolve --precision (auto | fp32 | bf16 | fp16) for this process's device.

    Measures on a CPU only for auto (and only when the cache lacks the figures). Call it on one
    process and share the result: ranks must agree, and two probes at once disturb each other.
    """
    import torch

    if choice != "auto":
        return Choice("no" if choice == "fp32" else choice, "as asked (--precision)")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", "auto: the GPU supports bf16")
        return Choice("fp16", "auto: the GPU has no bf16, fp16 with a loss scaler")
    from lib.train.flops import ProbeFailed, cpu_throughput

    # no shapes given (audit.py): those of the default preset, 8 x 256 tokens (shares its cache entry)
    shapes = [list(s) for s in (shapes or model_matmul_shapes(256, 704, 16384, 2048))]
    try:
        figures, how = cpu_throughput({"model_fp32": ("fp32", shapes), "model_bf16": ("bf16", shapes)}, refresh)
    except ProbeFailed as exc:  # fp32 is never wrong: at worst slower where bf16 is native
        return Choice("no", f"auto: warning: the bf16/fp32 probe gave nothing to decide by ({exc}); fp32, which "
                            "is correct on every CPU (--precision bf16 to choose it yourself)")
    mixed, why = decide_cpu(figures["model_fp32"], figures["model_bf16"])
    return Choice(mixed, f"auto: {why} ({how}, {torch.get_num_threads()} threads)")


def recorded(run_dir, what: str = "was trained") -> Choice | None:
    """The precision a run chose (its provenance.json), when this process has the kind of device
    it ran on (a CPU, or a GPU); else None."""
    import json
    from pathlib import Path

    import torch

    prov = Path(run_dir) / "provenance.json" if run_dir is not None else None
    try:
        found = json.loads(prov.read_text(encoding="utf-8")) if prov is not None and prov.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("mixed_precision") not in ("no", "bf16", "fp16") or \
            str(found.get("device", "")).startswith("cuda") != torch.cuda.is_available():
        return None
    return Choice(found["mixed_precision"], f"auto: as {run_dir} {what} (its provenance.json)")


def resolve_on_main(choice: str, shapes, state, kept: Choice | None = None) -> Choice:
    """`resolve` on the main process of `state` (an Accelerate PartialState), sent to every rank;
    `kept` (a resumed run's own choice) instead, for auto, without measuring."""
    from lib.train.distributed import broadcast_from_main

    if choice == "auto" and kept is not None:
        return kept
    return broadcast_from_main(resolve(choice, shapes) if state.is_main_process else None, state)
