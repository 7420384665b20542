"""Preference objectives on (chosen, rejected) response pairs, by name (PREFERENCE_LOSSES).

A pair is one prompt with two responses. Each response is scored by its log-probability under the
model being trained (the policy) and, for the objectives that have one, under a frozen reference
(the starting model): the sum over the response's tokens of log p(token | everything before it),
prompt tokens masked out. The reward of a response is beta times its log-ratio, policy minus
reference, and a pair counts as ranked right when the chosen response's reward is the higher.

    dpo    -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))    (Rafailov et al., 2023)
    ipo    (the same difference, each log-ratio averaged per response token, - 1 / (2 beta))^2
                                                                          (Azar et al., 2023)
    simpo  -log sigmoid(beta * (mean chosen log-prob - mean rejected log-prob) - gamma): no
           reference; its reward is beta times the mean log-prob      (Meng et al., 2024)

IPO's per-token averaging is what trl does, and what the IPO authors confirmed to it. Any of them
may add `sft_weight` times the chosen response's negative log-likelihood per token (RPO, Pang et
al., 2024; trl's loss_type ["sigmoid", "sft"]): the ranking objectives alone may lower both
responses' likelihood, and a small model's answers then fall apart. Every figure here is per
pair; a step's loss is their mean over every pair of the step (pair-weighted, whatever the
micro-batch split).
"""
from __future__ import annotations

from dataclasses import dataclass

from lib.plugins import Registry

PREFERENCE_LOSSES = Registry("preference")
"""Preference objectives by name: functions (policy, reference, PreferenceOptions) -> PairFigures."""


@dataclass
class PreferenceOptions:
    """The preference objective (train.py on preference data)."""

    name: str = "dpo"
    """dpo, ipo or simpo (or one a plugin registers in PREFERENCE_LOSSES)."""
    beta: float = 0.1
    """How far the policy may move from the reference: the scale of the rewards (DPO's beta; IPO's
    regularization, its target margin being 1 / (2 beta); SimPO's reward scale, where 2.0 is usual)."""
    gamma: float = 0.5
    """SimPO's target reward margin (unused by dpo and ipo)."""
    sft_weight: float = 0.0
    """Adds this times the chosen response's negative log-likelihood per token to each pair's loss:
    it keeps the chosen answers likely while the pair's ranking is learned (0: the objective alone)."""


@dataclass
class Scores:
    """Per pair: the summed log-probabilities of the chosen and rejected responses, and their
    numbers of response tokens."""

    chosen: "object"
    rejected: "object"
    chosen_tokens: "object"
    rejected_tokens: "object"


@dataclass
class PairFigures:
    """Per pair (tensors of one value per pair): the loss and the rewards it ranks by."""

    loss: "object"
    chosen_reward: "object"
    rejected_reward: "object"

    @property
    def margin(self):
        return self.chosen_reward - self.rejected_reward

    @property
    def ranked_right(self):
        """1.0 where the chosen response's reward is the higher (reward accuracy), else 0.0."""
        return (self.chosen_reward > self.rejected_reward).float()


def response_logps(logits, input_ids, response_mask):
    """(sum of log p(token | before) over each row's response tokens, their count), per row, in
    float32. `response_mask` is 1 on response tokens (the targets), 0 on the prompt and padding."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:].to(picked.dtype)
    return (picked * mask).sum(-1), mask.sum(-1)


def pair_scores(logits, input_ids, response_mask) -> Scores:
    """Scores of a batch laid out as [the pairs' chosen rows; their rejected rows], in that order."""
    logps, counts = response_logps(logits, input_ids, response_mask)
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    return Scores(chosen, rejected, n_chosen, n_rejected)


def _logratios(policy: Scores, reference: Scores):
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


@PREFERENCE_LOSSES.register("dpo", uses_reference=True)
def dpo(policy: Scores, reference: Scores, opt: PreferenceOptions) -> PairFigures:
    import torch.nn.functional as F

    chosen, rejected = _logratios(policy, reference)
    return PairFigures(-F.logsigmoid(opt.beta * (chosen - rejected)), opt.beta * chosen.detach(),
                       opt.beta * rejected.detach())


@PREFERENCE_LOSSES.register("ipo", uses_reference=True)
def ipo(policy: Scores, reference: Scores, opt: PreferenceOptions) -> PairFigures:
    chosen, rejected = _logratios(policy, reference)
    delta = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    return PairFigures((delta - 1 / (2 * opt.beta)) ** 2, opt.beta * chosen.detach(), opt.beta * rejected.detach())


@PREFERENCE_LOSSES.register("simpo", uses_reference=False)
def simpo(policy: Scores, reference: Scores | None, opt: PreferenceOptions) -> PairFigures:
    import torch.nn.functional as F

    chosen = opt.beta * policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected = opt.beta * policy.rejected / policy.rejected_tokens.clamp(min=1)
    return PairFigures(-F.logsigmoid(chosen - rejected - opt.gamma), chosen.detach(), rejected.detach())


def pair_figures(objective, policy: Scores, reference: Scores | None, opt: PreferenceOptions) -> PairFigures:
    """`objective` (a PREFERENCE_LOSSES entry) on the pairs, with the SFT term of `opt.sft_weight`
    added to each pair's loss: what a run optimizes and its evaluations report."""
    figures = objective(policy, reference, opt)
    if opt.sft_weight:
        nll = -policy.chosen / policy.chosen_tokens.clamp(min=1)
        figures.loss = figures.loss + opt.sft_weight * nll
    return figures


def summary(figures: PairFigures, policy: Scores) -> dict[str, float]:
    """The means over the pairs that every sink records: loss, reward accuracy and margin, the
    chosen and rejected rewards and summed log-probabilities, and the log-probability accuracy
    (the share of pairs whose chosen response the model itself finds the likelier: no reference)."""
    means = figure_rows(figures, policy).mean(0).tolist()
    return {"loss": float(figures.loss.detach().mean()), **dict(zip(FIGURES, means))}


def batch_scores(model, batch, device) -> Scores:
    """The Scores of a lib.data.pairs.PairBatch under `model`."""
    import torch

    inputs = batch.model_inputs(device)
    return pair_scores(model(**inputs).logits, inputs["input_ids"], torch.from_numpy(batch.response_mask).to(device))


def pair_logps(model, rows, batch_size: int, device, autocast=None):
    """[pairs, 2] float64: each pair's (chosen, rejected) summed log-probability under `model` in
    eval mode (its mode put back after), for every pair of `rows` (lib.data.pairs.PairRows) in order."""
    import contextlib

    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    out = np.zeros((len(rows), 2), dtype=np.float64)
    with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            s = batch_scores(model, rows.make_batch(idx), device)
            out[idx, 0], out[idx, 1] = s.chosen.double().cpu().numpy(), s.rejected.double().cpu().numpy()
    model.train(was_training)
    return out


def rows_summary(model, rows, reference, objective, opt: PreferenceOptions, batch_size: int, device,
                 autocast=None) -> dict[str, float]:
    """summary() over every pair of `rows` (lib.data.pairs.PairRows) scored by `model` in eval mode,
    against `reference` ([pairs, 2] log-probabilities, or None for a reference-free objective), with
    `objective` (a PREFERENCE_LOSSES entry): what eval.py prints and train.py's evaluations record."""
    import torch

    logps = torch.from_numpy(pair_logps(model, rows, batch_size, device, autocast))
    counts = torch.from_numpy(rows.response_tokens()).double()
    policy = Scores(logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1])
    ref = None if reference is None else torch.from_numpy(reference)
    ref_scores = None if ref is None else Scores(ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1])
    return summary(pair_figures(objective, policy, ref_scores, opt), policy)


def reference_logps(model, rows, batch_size: int, device, autocast=None):
    """pair_logps under the starting model, computed once at a run's start: a LoRA model with its
    adapter switched off, so no second copy of the model is held; 16 bytes a pair."""
    import contextlib

    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        return pair_logps(model, rows, batch_size, device, autocast)


FIGURES = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
           "logp_accuracy")


class PairObjective:
    """The training objective on preference pairs (train.py): `loss_sum` of a PairBatch, whose
    `reference` holds the pairs' log-probabilities under the reference, and the figures of the
    pairs it scored since the last `take_logged` (this process's sums, added over processes there)."""

    fused = False  # the log-probabilities need every row's full logits

    def __init__(self, opt: PreferenceOptions):
        self.opt = opt
        self.fn = PREFERENCE_LOSSES.get(opt.name, "--preference.name")
        self.uses_reference = PREFERENCE_LOSSES.meta(opt.name, "uses_reference", True)
        self.sums = None  # float64 [len(FIGURES) + 1]: the figures' sums, then the pairs counted

    def loss_sum(self, forward, batch, device):
        """The sum of the batch's pair losses (the loop divides by the step's pairs: each pair weighs
        the same), float32, from one forward pass of its [chosen; rejected] rows."""
        import torch

        policy = batch_scores(forward, batch, device)
        reference = None
        if self.uses_reference:
            ref = torch.from_numpy(batch.reference).to(device=device, dtype=policy.chosen.dtype)
            reference = Scores(ref[:, 0], ref[:, 1], policy.chosen_tokens, policy.rejected_tokens)
        figures = pair_figures(self.fn, policy, reference, self.opt)
        per_pair = figure_rows(figures, policy)
        found = torch.cat([per_pair.sum(0), per_pair.new_tensor([len(per_pair)])])
        self.sums = found if self.sums is None else self.sums + found
        return figures.loss.float().sum()

    def take_logged(self, add_up=None) -> dict[str, float]:
        """The figures' means over the pairs scored since the last call (`add_up`: a sum over
        processes, every process calling it), then cleared."""
        import torch

        sums = self.sums if self.sums is not None else torch.zeros(len(FIGURES) + 1, dtype=torch.float64)
        sums = add_up(sums) if add_up else sums
        self.sums = None
        n = max(float(sums[-1]), 1.0)
        return {name: float(v) / n for name, v in zip(FIGURES, sums[:-1].tolist())}

    def window_state(self) -> list[float]:
        """The unlogged sums, for a checkpoint (restored by load_window): a resumed run's first
        line averages over what a straight run's does."""
        return [] if self.sums is None else self.sums.tolist()

    def load_window(self, values: list[float], device) -> None:
        import torch

        self.sums = torch.tensor(values, dtype=torch.float64, device=device) if values else None


def figure_rows(figures: PairFigures, policy: Scores):
    """[pairs, len(FIGURES)]: each pair's figures, in FIGURES' order."""
    import torch

    columns = [figures.ranked_right, figures.margin, figures.chosen_reward, figures.rejected_reward,
               policy.chosen, policy.rejected, (policy.chosen > policy.rejected).float()]
    return torch.stack([c.detach().double() for c in columns], dim=1)
