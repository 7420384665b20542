"""The output layer and the cross-entropy loss computed together, in row chunks.

With a large vocabulary the output layer and the loss are a large share of a small model's
step: the logits of a micro-batch (rows x vocabulary: 67M values for 16 x 256 tokens and 16k
pieces) are written, cast to float32, read by log-softmax, written again as their gradient
and read by two more matmuls. `fused_linear_ce` never holds them whole. For each chunk of rows
it computes the logits, the loss, the gradient of the logits (softmax minus one-hot) and from
it the gradients of the hidden states and of the weight, all in the forward pass, so a chunk's
logits are used while they are still in cache; backward only scales the stored gradients.
Rows without a target (padding, IGNORE_INDEX) are dropped first.

`FusedHead` routes a Hugging Face causal LM's output layer through it without changing the
model's parameters, names or wrapping (DDP, FSDP, torch.compile, saving).
"""
from __future__ import annotations

import functools

import torch

from lib.model.loss import IGNORE_INDEX

CHUNK_ROWS = 512
"""Rows per chunk: 512 x 16k float32 logits are 32 MiB (measured on the default preset: 256,
512 and 1024 within noise of each other, 128 slower)."""


def _softmax_grad(logits, t):
    """(sum of the chunk's token losses, d loss / d logits in the logits' dtype) for one chunk:
    logits (c, V) in the compute dtype, t (c, 1) target ids. Softmax in float32, in place on
    the float32 copy of the logits (fewer passes over memory in eager mode)."""
    lf = logits.float()
    target_logit = lf.gather(1, t)
    row_max = lf.amax(1, keepdim=True)
    exps = lf.sub_(row_max).exp_()
    sums = exps.sum(1, keepdim=True)
    loss = (row_max + sums.log() - target_logit).sum()  # log-sum-exp minus the target's logit
    probs = exps.mul_(sums.reciprocal())
    probs.scatter_add_(1, t, probs.new_full(t.shape, -1.0))  # softmax - one-hot
    return loss, probs.to(logits.dtype)


@functools.cache
def compiled_softmax_grad():
    """`_softmax_grad` through torch.compile, which fuses its passes over a chunk into fewer trips
    through memory. Rows are a dynamic dimension, so varying numbers of targets do not recompile."""
    return torch.compile(_softmax_grad, dynamic=True)


def _rows_grad(logits, t, rows):
    """(sum of the chunk's token losses, d loss / d logits in the logits' dtype) for a loss given
    per token by `rows(log_z, target_logit)` (lib.model.loss.TokenLoss.rows): its derivatives with
    respect to log Z and the target logit (autograd on the chunk's two columns), then
    d/dlogits = dloss/dlogZ * softmax + dloss/dtarget * one-hot."""
    lf = logits.float()
    with torch.enable_grad():
        log_z = torch.logsumexp(lf, 1).requires_grad_()
        target_logit = lf.gather(1, t).squeeze(1).requires_grad_()
        loss = rows(log_z, target_logit).sum()
        d_log_z, d_target = torch.autograd.grad(loss, (log_z, target_logit))
    probs = lf.sub_(log_z.detach()[:, None]).exp_().mul_(d_log_z[:, None])
    probs.scatter_add_(1, t, d_target[:, None])
    return loss.detach(), probs.to(logits.dtype)


def _chunked(hidden, weight, targets, chunk_rows: int, compute_dtype, need_h: bool, need_w: bool,
             softmax_grad=_softmax_grad, rows=None):
    """(sum of token losses float32, grad wrt hidden or None, grad wrt weight float32 or None).

    hidden: (N, d), weight: (V, d), targets: (N,) with IGNORE_INDEX where a row has no target.
    Matmuls run in compute_dtype, the softmax in float32. `rows`: a loss other than cross-entropy,
    per token from log Z and the target logit (lib.model.loss.TokenLoss.rows).
    """
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h_all = hidden.index_select(0, keep).to(compute_dtype)
    t_all = targets.index_select(0, keep)
    w = weight.to(compute_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_rows = torch.empty_like(h_all) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, h_all.size(0), chunk_rows):
        h = h_all[start:start + chunk_rows]
        t = t_all[start:start + chunk_rows, None]
        logits = torch.mm(h, w.t())                           # (c, V)
        if not (need_h or need_w):
            lf = logits.float()
            log_z, target_logit = torch.logsumexp(lf, 1), lf.gather(1, t).squeeze(1)
            loss += (rows(log_z, target_logit) if rows is not None else log_z - target_logit).sum()
            continue
        chunk_loss, g = softmax_grad(logits, t) if rows is None else _rows_grad(logits, t, rows)
        loss += chunk_loss
        if need_h:
            torch.mm(g, w, out=grad_rows[start:start + chunk_rows])
        if need_w:
            grad_w.add_(torch.mm(g.t(), h))
    grad_h = None
    if need_h:
        grad_h = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device)
        grad_h.index_copy_(0, keep, grad_rows)
    return loss, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype, softmax_grad, rows):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _chunked(
                hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_rows,
                compute_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1], softmax_grad, rows)
        ctx.shape, ctx.h_dtype, ctx.w_dtype = hidden.shape, hidden.dtype, weight.dtype
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (saved.pop(0).reshape(ctx.shape) * grad_loss).to(ctx.h_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (saved.pop(0) * grad_loss).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None


@torch.compiler.disable  # data-dependent row selection; under torch.compile this runs eagerly
def fused_linear_ce(hidden, weight, targets, chunk_rows: int = CHUNK_ROWS, compiled: bool = False, rows=None):
    """Sum over target tokens of cross_entropy(hidden @ weight.T, targets) as float32 (or of the
    per-token loss `rows(log_z, target_logit)`), with gradients for hidden and weight, without
    materializing the logits. The matmuls run in the autocast dtype when autocast is on;
    `compiled` fuses each chunk's cross-entropy softmax with torch.compile."""
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else weight.dtype)
    softmax_grad = compiled_softmax_grad() if compiled else _softmax_grad
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype, softmax_grad, rows)


class FusedLossLinear(torch.nn.Linear):
    """nn.Linear that, while `fused_targets` is set, returns the loss sum instead of logits."""

    fused_targets = None
    fused_rows = None
    fused_chunk_rows = CHUNK_ROWS
    fused_compiled = False

    def forward(self, hidden):
        if self.fused_targets is None:
            return super().forward(hidden)
        return fused_linear_ce(hidden, self.weight, self.fused_targets, self.fused_chunk_rows, self.fused_compiled,
                               self.fused_rows)


class FusedHead:
    """Routes a causal LM's output layer through `fused_linear_ce` for the loss.

    The output layer's class is switched in place to FusedLossLinear (a subclass of nn.Linear),
    so its parameter objects, their names, weight tying, DDP/FSDP wrapping and saving are all
    untouched, and without targets it computes logits exactly as before (evaluation,
    generation). During `loss_sum`, `model(**inputs).logits` carries the loss sum instead.
    """

    def __init__(self, head: FusedLossLinear):
        self.head = head

    @staticmethod
    def attach(model, chunk_rows: int = CHUNK_ROWS, compiled: bool = False) -> "FusedHead | None":
        """A FusedHead on `model`'s output layer, or None where it does not apply: an output
        layer that is not a plain bias-free nn.Linear (a LoRA-wrapped head, say), or logits
        soft-capped after it (lib/model/gpt.py). `compiled`:
        fuse each chunk's softmax with torch.compile (for runs that compile anyway)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        if getattr(getattr(model, "config", None), "logit_softcap", None):  # the loss is of the capped logits
            return None
        head.__class__ = FusedLossLinear
        head.fused_chunk_rows, head.fused_compiled = chunk_rows, compiled
        return FusedHead(head)

    def detach(self) -> None:
        """Make the output layer a plain nn.Linear again."""
        for name in ("fused_targets", "fused_rows", "fused_chunk_rows", "fused_compiled"):
            self.head.__dict__.pop(name, None)
        self.head.__class__ = torch.nn.Linear

    def loss_sum(self, model, inputs: dict, targets, loss=None):
        """(sum of token losses float32, number of target tokens) of one forward pass of `model`
        (which may be the DDP/FSDP-wrapped or compiled model): cross-entropy, or `loss`'s per-token
        rows (a lib.model.loss.TokenLoss)."""
        self.head.fused_targets = targets
        self.head.fused_rows = loss.fused_rows if loss is not None else None  # one object: compiled guards hold
        try:
            loss = model(**inputs).logits
        finally:
            self.head.fused_targets = self.head.fused_rows = None
        return loss, (targets != IGNORE_INDEX).sum()
