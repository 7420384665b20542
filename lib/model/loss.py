"""Training objectives by name (LOSSES), and token-weighted losses across accumulation steps and
data-parallel ranks.

A loss is a TokenLoss: per target token, a function of the log-partition log Z (the log-sum-exp
of that position's logits) and the target's logit; cross-entropy is `log Z - target logit`. Written
that way it runs on the fused output layer (lib/model/fused_loss.py), which never holds the full logits,
as well as on plain logits; a loss that needs the whole row of logits overrides `loss_sum` and sets
`fused = False` (the run then computes full logits, saying so). Plugins register more:

    # zloss.py: train.py --plugins zloss.py --loss.name zloss --loss.z 1e-4
    @LOSSES.register("zloss", options=ZLossOptions)      # a dataclass: its fields become --loss.* flags
    class ZLoss(TokenLoss):
        def rows(self, log_z, target_logit):
            return log_z - target_logit + self.cfg.z * log_z.square()

Held-out figures are always plain cross-entropy (token_loss_sum), whatever the run trains on.

A mean per micro-batch, averaged again over micro-batches and ranks, weights a short document
as heavily as a long one ("mean of means"). The gradient of one optimizer step should instead
be the mean over every target token of the whole step. So each micro-batch contributes
sum(token losses) / (target tokens in the whole step, all ranks), rescaled for the two averages
that happen anyway: DDP's mean over ranks and Accelerate's division by the accumulation steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from lib.plugins import Registry

IGNORE_INDEX = -100

LOSSES = Registry("loss")
"""Training objectives by name: TokenLoss subclasses, built as cls(cfg.loss). An entry may declare
an options dataclass (`register(name, options=...)`), whose fields become `--loss.<field>` flags."""


@dataclass
class LossConfig:
    """The training objective (held-out figures are cross-entropy whatever it is)."""

    name: str = "cross_entropy"
    """cross_entropy, or a loss a plugin registers (LOSSES; train.py --plugins)."""


def token_loss_sum(logits, targets):
    """(sum of token cross-entropies in nats as float32, number of target tokens): the one
    cross-entropy reduction of training, evaluation and export checks."""
    import torch.nn.functional as F

    # per-token losses summed by torch.sum rather than reduction="sum": the same gradient, and a
    # sum whose order does not depend on the process (the fused reduction's last bits did, here)
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )
    return per_token.sum(), (targets != IGNORE_INDEX).sum()


class TokenLoss:
    """Cross-entropy, and the base of losses written per token (see the module docstring)."""

    fused = True
    """Whether the fused output layer can compute it (it calls `rows` on each chunk's log Z and
    target logits, and takes its gradient from them)."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.fused_rows = self.rows if self.custom_rows() else None  # what the fused layer calls
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def rows(self, log_z, target_logit):
        """Per-token losses (float32, one per target token) from its log Z and target logit."""
        return log_z - target_logit

    def custom_rows(self) -> bool:
        """Whether `rows` is other than cross-entropy's (the fused layer then calls it)."""
        return type(self).rows is not TokenLoss.rows

    def loss_sum(self, logits, targets):
        """(sum of the token losses as float32, number of target tokens) from full logits."""
        if not self.custom_rows():
            return token_loss_sum(logits, targets)
        import torch

        lf = logits.float().reshape(-1, logits.size(-1))
        t = targets.reshape(-1)
        keep = t != IGNORE_INDEX
        lf, t = lf[keep], t[keep]
        return self.rows(torch.logsumexp(lf, 1), lf.gather(1, t[:, None]).squeeze(1)).sum(), keep.sum()

    def log(self, name: str, per_token) -> None:
        """Add a per-token figure to the step's log (its mean over the logged tokens appears in the
        training records as `loss_<name>`); for use inside `rows` or `loss_sum`."""
        self.sums[name] = self.sums.get(name, 0.0) + float(per_token.detach().float().sum())
        self.counts[name] = self.counts.get(name, 0) + int(per_token.numel())

    def take_logged(self, add_up=None) -> dict[str, float]:
        """The logged figures' means since the last call, then cleared: this process's (the main
        one's are recorded; `add_up` is not used)."""
        out = {f"loss_{k}": self.sums[k] / max(self.counts[k], 1) for k in self.sums}
        self.sums, self.counts = {}, {}
        return out

    def window_state(self) -> dict:
        """The figures logged since the last take_logged, for a checkpoint (load_window restores them)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_window(self, state: dict, device=None) -> None:
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))


LOSSES.register("cross_entropy", TokenLoss)


def build_loss(cfg) -> TokenLoss:
    """The loss `cfg.name` names (LOSSES), built on its options."""
    return LOSSES.get(cfg.name, "--loss.name")(cfg)


def step_scaled_loss(loss_sum, step_tokens: int, world_size: int, accum_steps: int):
    """The loss to hand to `accelerator.backward` for one micro-batch.

    `step_tokens` is the number of target tokens in the whole optimizer step across all ranks.
    Accelerate divides by `accum_steps` and DDP averages over `world_size`; multiplying by both
    leaves each token weighted 1/step_tokens in the summed gradient.
    """
    return loss_sum * (world_size * accum_steps / max(step_tokens, 1))
