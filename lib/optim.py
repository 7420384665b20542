"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules.

The schedule is a pure function of the optimizer step, set on the optimizer before each step:
nothing to checkpoint, and the same for any number of processes or accumulation steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lib.plugins import Registry

SCHEDULES = Registry("schedule")
"""Learning-rate schedules by name: fn(progress, cfg) -> the learning rate at `progress` (0 at the
end of warmup, 1 at the last step); lr_at applies the warmup. Plugins add more (lib/plugins.py)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule; steps are optimizer steps."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear and wsd schedules)."""
    schedule: str = "cosine"
    """cosine, linear, constant, wsd (warmup-stable-decay), or a schedule a plugin registers
    (train.py --plugins; lib/plugins.py)."""
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """wsd only: share of the steps after warmup spent decaying."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `max_steps` run.

    Linear warmup from lr/warmup_steps to lr over `warmup_steps`, then the named schedule
    (SCHEDULES), the built-in ones decaying to `lr * min_lr_ratio` at the last step.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps - 1)
    return SCHEDULES.get(cfg.schedule, "--optim.schedule")(min(1.0, (step - cfg.warmup_steps) / span), cfg)


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
    """AdamW where only parameters of 2+ dimensions (matmul weights, embeddings) decay.

    Norm weights and biases are excluded from decay, as decaying them only shrinks the scale
    the model has learned.
    """
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA): several times faster per step than the foreach
    # implementation (docs/2026-12-01-measurements.md)
    params = decay + no_decay
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if fused and params else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
