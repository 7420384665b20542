"""z-loss: each target token's loss adds z * log(Z)^2, Z the softmax normalizer of its logits.

    python scripts/train.py --plugins experiments/zloss/zloss.py --loss.name zloss --loss.z 1e-4 ...
"""
from dataclasses import dataclass

from lib.model.loss import LOSSES, TokenLoss


@dataclass
class ZLossOptions:
    z: float = 1e-4
    """Weight of log(Z)^2 per target token (PaLM's 1e-4): keeps the logits from drifting upward."""


@LOSSES.register("zloss", options=ZLossOptions)
class ZLoss(TokenLoss):
    def rows(self, log_z, target_logit):
        self.log("log_z_sq", log_z.square())  # logged as loss_log_z_sq
        return log_z - target_logit + self.cfg.z * log_z.square()
