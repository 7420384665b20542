"""Token-weighted cross-entropy across accumulation steps and data-parallel ranks.

A mean per micro-batch, averaged again over micro-batches and ranks, weights a short document
as heavily as a long one ("mean of means"). The gradient of one optimizer step should instead
be the mean over every target token of the whole step. So each micro-batch contributes
sum(token losses) / (target tokens in the whole step, all ranks), rescaled for the two averages
that happen anyway: DDP's mean over ranks and Accelerate's division by the accumulation steps.
"""
from __future__ import annotations

IGNORE_INDEX = -100


def token_loss_sum(logits, targets):
    """(sum of token cross-entropies in nats as float32, number of target tokens)."""
    import torch.nn.functional as F

    # per-token losses summed by torch.sum rather than reduction="sum": the same gradient, and a
    # sum whose order does not depend on the process (the fused reduction's last bits did, here)
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )
    return per_token.sum(), (targets != IGNORE_INDEX).sum()


def step_scaled_loss(loss_sum, step_tokens: int, world_size: int, accum_steps: int):
    """The loss to hand to `accelerator.backward` for one micro-batch.

    `step_tokens` is the number of target tokens in the whole optimizer step across all ranks.
    Accelerate divides by `accum_steps` and DDP averages over `world_size`; multiplying by both
    leaves each token weighted 1/step_tokens in the summed gradient.
    """
    return loss_sum * (world_size * accum_steps / max(step_tokens, 1))
