"""Optimizers by name (AdamW; Muon for hidden matrices with AdamW for the rest) and learning-rate
schedules.

The schedule is a function of the optimizer step (lr_at), or under a time budget of the share of
the training time spent (lr_at_progress, lib/train/budget.py), set on the optimizer before each
step: the same for any number of processes or accumulation steps.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

from lib.plugins import Registry

OPTIMIZERS = Registry("optimizer")
"""Optimizers by name: fn(model, cfg) -> a torch.optim.Optimizer over the model's trainable
parameters, whose every parameter group takes the schedule's learning rate (set_lr). Registered
with `state_numel` (fn(model) -> float32 state values it keeps: what a checkpoint holds besides the
weights, which the disk-space check and a time budget's checkpoint estimate use; without it, two
per trainable parameter, as AdamW's moments), `whole_matrices=True` where its update needs each
weight matrix whole (so FSDP, which shards them, is refused), and optionally `options` (a
dataclass of its own --optim.* flags). Plugins add more (lib/plugins.py)."""

SCHEDULES = Registry("schedule")
"""Learning-rate schedules by name: fn(progress, cfg) -> the learning rate at `progress` (0 at the
end of warmup, 1 at the last step); lr_at applies the warmup. Registered optionally with `options`
(a dataclass of its own --optim.* flags, which `cfg` then holds). Plugins add more (lib/plugins.py)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule; steps are optimizer steps."""

    name: str = "adamw"
    """adamw; muon (Muon for the 2-D weights inside the blocks, AdamW for embeddings, output
    layer, norms and biases: one learning rate for both, Muon's update scaled to AdamW's size); or
    an optimizer a plugin registers (OPTIMIZERS)."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear and wsd schedules)."""
    schedule: str = "cosine"
    """cosine, linear, constant, wsd (warmup-stable-decay), or a schedule a plugin registers
    (train.py --plugins; lib/plugins.py)."""
    warmup_steps: int = 50
    warmup_fraction: Optional[float] = None
    """When set, warmup is this share of the schedule's steps (under a time budget, of its training
    time), at least one step, instead of warmup_steps: a short run still warms up, trains and
    decays."""
    decay_fraction: float = 0.2
    """wsd only: share of the steps after warmup spent decaying."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    muon_momentum: float = 0.95
    """muon: momentum of its (Nesterov) update."""


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `max_steps` run.

    Linear warmup from lr/warmup to lr over the warmup steps (warmup_steps), then the named schedule
    (SCHEDULES), the built-in ones decaying to `lr * min_lr_ratio` at the last step.
    """
    warmup = warmup_steps(max_steps, cfg)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, max_steps - warmup - 1)
    return SCHEDULES.get(cfg.schedule, "--optim.schedule")(min(1.0, (step - warmup) / span), cfg)


def lr_at_progress(step: int, progress: float, cfg: OptimConfig, warm_end: Optional[float] = None) -> float:
    """Learning rate for optimizer step `step` (0-based) at `progress` (0 to 1, the share of a time
    budget's training time spent at the end of the step: lib/train/budget.py). Linear warmup over
    the first warmup_steps steps (warmup_fraction: while progress is below it), then the named
    schedule over the progress left after warmup (`warm_end`: the progress where the warmup
    steps ended), at its end (the floor of the built-in ones) at progress 1."""
    schedule = SCHEDULES.get(cfg.schedule, "--optim.schedule")
    if progress >= 1.0:
        return schedule(1.0, cfg)
    if cfg.warmup_fraction is not None:
        start = cfg.warmup_fraction
        if progress < start:
            return cfg.lr * progress / start
    else:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        start = warm_end or 0.0
    return schedule(min(1.0, max(0.0, (progress - start) / max(1.0 - start, 1e-9))), cfg)


def warmup_steps(max_steps: int, cfg: OptimConfig) -> int:
    """Warmup steps of a `max_steps` schedule: warmup_fraction of it (at least 1) when set, else
    warmup_steps."""
    if cfg.warmup_fraction is not None:
        return max(1, round(cfg.warmup_fraction * max_steps))
    return cfg.warmup_steps


@SCHEDULES.register("constant")
def constant(progress: float, cfg: OptimConfig) -> float:
    return cfg.lr


@SCHEDULES.register("linear")
def linear(progress: float, cfg: OptimConfig) -> float:
    return cfg.lr + (cfg.lr * cfg.min_lr_ratio - cfg.lr) * progress


@SCHEDULES.register("cosine")
def cosine(progress: float, cfg: OptimConfig) -> float:
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("wsd")
def warmup_stable_decay(progress: float, cfg: OptimConfig) -> float:
    """Flat at lr, then a linear decay to the floor over the last decay_fraction."""
    stable = 1.0 - cfg.decay_fraction
    if progress <= stable:
        return cfg.lr
    return cfg.lr + (cfg.lr * cfg.min_lr_ratio - cfg.lr) * (progress - stable) / max(cfg.decay_fraction, 1e-12)


def build_optimizer(model, cfg: OptimConfig):
    """The optimizer --optim.name names (OPTIMIZERS), over the model's trainable parameters."""
    return OPTIMIZERS.get(cfg.name, "--optim.name")(model, cfg)


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def state_numel(model, cfg: OptimConfig) -> int:
    """Values the optimizer --optim.name names keeps as state for `model` (see OPTIMIZERS)."""
    count = OPTIMIZERS.meta(cfg.name, "state_numel")
    return int(count(model)) if count is not None else 2 * _numel(_trainable(model))


def _adamw(params: list, cfg: OptimConfig):
    """AdamW where only parameters of 2+ dimensions (matmul weights, embeddings) decay: norm
    weights and biases are excluded, as decaying them only shrinks the scale the model learned."""
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA): several times faster per step than the foreach
    # implementation (docs/2026-12-01-measurements.md)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if fused and params else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


@OPTIMIZERS.register("adamw", state_numel=lambda model: 2 * _numel(_trainable(model)))  # two moments
def adamw(model, cfg: OptimConfig):
    return _adamw(_trainable(model), cfg)


def _muon_split(model) -> tuple[list, list]:
    """(the 2-D weights inside the blocks, the rest) of the trainable parameters."""
    edges = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
             if m is not None and getattr(m, "weight", None) is not None}
    params = _trainable(model)
    return ([p for p in params if p.ndim == 2 and id(p) not in edges],
            [p for p in params if p.ndim != 2 or id(p) in edges])


def _muon_state(model) -> int:
    hidden, rest = _muon_split(model)  # a momentum buffer per hidden weight, AdamW's two moments for the rest
    return _numel(hidden) + 2 * _numel(rest) if hidden else 2 * _numel(rest)


@OPTIMIZERS.register("muon", state_numel=_muon_state, whole_matrices=True)
def muon(model, cfg: OptimConfig):
    """Muon (orthogonalized momentum, torch.optim.Muon) for the 2-D weights inside the blocks,
    AdamW for the rest: embeddings and the output layer (whose rows are looked up or scored one
    token at a time, not used as one linear map), norms and biases. Muon's step is scaled to the
    size of an AdamW step ("match_rms_adamw"), so the schedule's one learning rate serves both."""
    import torch

    hidden, rest = _muon_split(model)
    params = hidden + rest
    if not hidden:
        return _adamw(params, cfg)
    orthogonal = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                  adjust_lr_fn="match_rms_adamw")
    return combined({"muon": orthogonal, "adamw": _adamw(rest, cfg)})


@functools.cache  # torch is imported on first use, not with this module
def _combined_class():
    import torch

    class _Combined(torch.optim.Optimizer):
        """Optimizers that each own some of the parameters, used as one: one list of parameter
        groups (the parts' own, so a learning rate set here reaches them), one step, one zero_grad,
        and a state dict of the parts' state dicts by name. Accelerate prepares, checkpoints and
        restores it like any optimizer."""

        def __init__(self, parts: dict):
            self.parts = parts
            super().__init__([p for o in parts.values() for g in o.param_groups for p in g["params"]], {})
            self._bind()

        def _bind(self) -> None:
            self.param_groups = [g for o in self.parts.values() for g in o.param_groups]

        @property
        def state(self):  # read-only view: the parts keep their own states
            return {p: s for o in self.parts.values() for p, s in o.state.items()}

        @state.setter
        def state(self, value) -> None:  # Optimizer.__init__ assigns an empty one
            pass

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for o in self.parts.values():
                o.step()
            return loss

        def state_dict(self) -> dict:
            return {"parts": {name: o.state_dict() for name, o in self.parts.items()}}

        def load_state_dict(self, state_dict: dict) -> None:
            saved = state_dict.get("parts", {})
            if set(saved) != set(self.parts):
                raise ValueError(f"optimizer state holds parts {sorted(saved)}, this optimizer has {sorted(self.parts)}")
            for name, o in self.parts.items():
                o.load_state_dict(saved[name])
            self._bind()  # loading replaces the parts' group dicts

    return _Combined


def combined(parts: dict):
    """A torch.optim.Optimizer made of `parts` (name -> optimizer): see _combined_class."""
    return _combined_class()(parts)


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
