"""One optimizer step's gradient, as scripts/train.py computes it, for each of several ways of
splitting the step, written to OUT/<name>.pt.

    python tests/helpers/grad_step.py OUT whole=1 accum2=2 naive=2+naive plain=2+plain
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml tests/helpers/grad_step.py OUT ddp=1

A way is name=K[+naive][+plain]: K micro-batches per process. The global batch is 8 sequences of
very uneven lengths (padded, padding ignored). Rank r of W takes rows r, r+W, ...; its rows are
cut into K micro-batches. +naive uses the per-micro-batch mean loss instead of lib.model.loss's token
weighting. The loss goes through the fused output layer (lib/model/fused_loss.py) as in
scripts/train.py, or with +plain through full logits. Every way starts from the same weights.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from lib.model.fused_loss import FusedHead  # noqa: E402
from lib.model.loss import IGNORE_INDEX, step_scaled_loss, token_loss_sum  # noqa: E402
from lib.model.build import ModelConfig, build_model  # noqa: E402

LENGTHS = [3, 48, 5, 64, 2, 40, 64, 7]


def global_batch():
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(4, 200, (len(LENGTHS), 64), generator=g)
    labels = torch.randint(4, 200, (len(LENGTHS), 64), generator=g)
    for row, n in enumerate(LENGTHS):
        labels[row, n:] = IGNORE_INDEX
        inputs[row, n:] = 3
    return inputs, labels


def one_step(acc, accum: int, naive: bool, plain: bool):
    """The gradient of one optimizer step split into `accum` micro-batches per process (on the
    main process; None elsewhere)."""
    acc.gradient_accumulation_steps = accum
    acc.step = 0  # Accelerate's micro-batch counter: this step starts afresh
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", d_model=32, n_layers=2, n_heads=2, max_seq_len=64), 200,
                        {"unk": 0, "bos": 1, "eos": 2, "pad": 3})
    fused = None if plain else FusedHead.attach(model)
    model = acc.prepare(model)
    world, rank = acc.num_processes, acc.process_index
    inputs, labels = global_batch()
    mine = list(range(rank, len(LENGTHS), world))
    micro = [mine[k::accum] for k in range(accum)]
    local = torch.tensor(sum(int((labels[m] != IGNORE_INDEX).sum()) for m in micro))
    step_tokens = int(acc.reduce(local, reduction="sum"))
    for rows in micro:
        with acc.accumulate(model):
            mask = (labels[rows] != IGNORE_INDEX).long()
            kwargs = dict(input_ids=inputs[rows], attention_mask=mask, use_cache=False)
            if fused is not None:
                loss_sum, n = fused.loss_sum(model, kwargs, labels[rows])
            else:
                loss_sum, n = token_loss_sum(model(**kwargs).logits, labels[rows])
            loss = loss_sum / n if naive else step_scaled_loss(loss_sum, step_tokens, world, accum)
            acc.backward(loss)
    if acc.is_main_process:
        return torch.cat([p.grad.flatten() for p in acc.unwrap_model(model).parameters()])
    return None


def main():
    out = Path(sys.argv[1])
    acc = Accelerator(cpu=True)
    for way in sys.argv[2:]:
        name, spec = way.split("=")
        accum, *flags = spec.split("+")
        grads = one_step(acc, int(accum), "naive" in flags, "plain" in flags)
        if grads is not None:
            torch.save(grads, out / f"{name}.pt")
        acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
