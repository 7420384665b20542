"""Checkpoints resume bit for bit: stop anywhere (or be killed), resume, and get the run you
would have had. Dropout is on, so the restored random state matters.

Runs are in fp32: on this CPU, bf16 autocast (AMX kernels) gave results differing in the
last bits between two identical processes now and then (about 1 run in 3 here; not with AMX
disabled or in fp32), which no checkpoint can fix. See README, Checkpoints and resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import BITWISE, REPO, accelerate_launch, run_script, train

DDP = accelerate_launch("cpu_ddp")
FSDP = accelerate_launch("cpu_fsdp2")


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}


def weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert la == lb, next(s for s in sorted(la) if la[s] != lb.get(s))  # the first diverging step
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def tables(run: Path) -> list:
    """metrics.jsonl, metrics.csv and metrics.parquet read back (pandas), checked to hold the same
    rows; the (type, step) of each row."""
    import pandas as pd

    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    csv, parquet = pd.read_csv(run / "metrics.csv"), pd.read_parquet(run / "metrics.parquet")
    rows = [(r["type"], r["step"]) for r in log]
    for table in (csv, parquet):
        assert list(zip(table["type"], table["step"])) == rows
        train = table[table["type"] == "train"]
        assert list(train["loss"]) == [r["loss"] for r in log if r["type"] == "train"]
    return rows


def blocks_per_epoch(data: Path, seq_len: int = 64) -> int:
    from lib.data.batches import build_train_data, DataConfig

    return len(build_train_data(data / "tokens", DataConfig(seq_len=seq_len), {"pad": 3}))


@pytest.mark.parametrize("accum, optimizer", [(1, "adamw"), (2, "adamw"), (1, "muon")])
def test_stop_and_resume_is_bitwise_the_straight_run(tiny_data, tmp_path, accum, optimizer):
    # logged every 4 steps and stopped at 6: mid-epoch and inside a logging window; Muon's momentum
    # and AdamW's moments are both restored
    # and the metrics in every format: the resumed run's tables hold the straight run's rows
    common = [*BITWISE, "--log_every", "4", "--max_steps", "14", "--grad_accum_steps", str(accum),
              "--checkpoint_every", "0", "--eval_every", "5", "--optim.name", optimizer,
              "--metrics_out", "ndjson,csv,parquet"]
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "6")
    # the stopped run's tables are there, with its stop's evaluation and final record
    assert tables(tmp_path / "resumed")[-4:] == [("train", 4), ("eval", 5), ("eval", 6), ("final", 6)]
    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_0000006" in proc.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    straight = tables(tmp_path / "straight")
    assert tables(tmp_path / "resumed") == straight
    assert straight.count(("final", 14)) == 1 and [s for t, s in straight if t == "eval"] == [5, 10, 14]


def test_resume_across_an_epoch_boundary_and_with_ddp(tiny_data, micro_data, tmp_path):
    # a micro-batch of 8 and few blocks per epoch: stop exactly at the end of an epoch
    steps_per_epoch = blocks_per_epoch(micro_data) // 8
    common = [*BITWISE, "--log_every", "1", "--max_steps", str(steps_per_epoch + 3), "--checkpoint_every", "0",
              "--eval_every", "0"]
    train(micro_data, tmp_path, "straight", *common)
    train(micro_data, tmp_path, "resumed", *common, "--stop_at_step", str(steps_per_epoch))
    train(micro_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")

    # 2 processes, stopped at step 6 inside a logging window of 4 steps: each rank's partial
    # window (its own blocks' loss sum) must come back to that rank, or step 8 logs another loss
    ddp = [*BITWISE, "--log_every", "4", "--max_steps", "12", "--checkpoint_every", "0", "--eval_every", "0"]
    train(tiny_data, tmp_path, "ddp_straight", *ddp, launcher=DDP)
    train(tiny_data, tmp_path, "ddp_resumed", *ddp, "--stop_at_step", "6", launcher=DDP)
    train(tiny_data, tmp_path, "ddp_resumed", *ddp, "--resume", "auto", launcher=DDP)
    assert sorted(losses(tmp_path / "ddp_resumed")) == [4, 8, 12]
    assert_same_run(tmp_path / "ddp_straight", tmp_path / "ddp_resumed")


def test_audit_resume_passes_and_names_the_first_diverging_step(tiny_data, tmp_path, monkeypatch):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text((REPO / "configs/train/smoke.yaml").read_text().replace("data/smoke", str(tiny_data)))
    proc = run_script("scripts/audit.py", "resume", "--config", str(cfg), "--steps", "6", "--stop_at", "2")
    assert "[PASS] every logged loss is bitwise equal" in proc.stdout and "resume check: PASS" in proc.stdout
    # a copied loop that forgets part of its state on resume (where it was in the data)
    broken = tmp_path / "experiments" / "broken" / "train.py"
    broken.parent.mkdir(parents=True)
    src = (REPO / "scripts" / "train.py").read_text()
    line = 'sampler.load_state_dict(state["sampler"], cfg.allow_data_change)'
    assert line in src
    broken.write_text(src.replace(line, "pass"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the copy lives outside the repository
    proc = run_script("scripts/audit.py", "resume", "--config", str(cfg), "--steps", "6", "--stop_at", "3",
                      "--train_script", str(broken), check=False)
    assert proc.returncode == 1 and "[FAIL] first diverging step 4:" in proc.stdout
    assert "resume check: FAIL" in proc.stdout


def test_corrupt_newest_checkpoint_is_named_and_skipped(tiny_data, tmp_path):
    common = [*BITWISE, "--log_every", "1", "--max_steps", "10", "--checkpoint_every", "2", "--keep_last_n", "3",
              "--eval_every", "0"]
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "6")
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    # weights as safetensors; everything else a JSON record or data that loads with weights_only
    # (Accelerate's loader: torch.load(weights_only=True), numpy arrays allowed for RNG states)
    from accelerate.utils import load as accelerate_load

    files = sorted(p.name for p in (ckpts / "step_0000006").iterdir())
    assert "model.safetensors" in files and "trainer_state.json" in files and len(files) > 2
    for name in files:
        if not name.endswith((".safetensors", ".json")):
            accelerate_load(ckpts / "step_0000006" / name, weights_only=True)
    weights = next((ckpts / "step_0000006").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))
    # an explicit --resume of it is refused, naming the file
    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", str(ckpts / "step_0000006"), check=False)
    assert proc.returncode == 2 and f"file {weights.name} is corrupt (sha256 mismatch)" in proc.stderr
    # --resume auto says so and falls back to the previous complete checkpoint
    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert f"skipping {ckpts / 'step_0000006'}" in proc.stdout and "resumed from" in proc.stdout
    assert "step_0000004 at step 4" in proc.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_fp16_loss_scaler_drops_overflowing_updates_and_resumes(tiny_data, tmp_path):
    # fp16 runs on CPU the way it does on a GPU: a first scale of 2**24 makes the first updates
    # overflow, each one halving the scale and leaving the weights alone, and none stopping the run
    # (the default --on_nonfinite stop is about the loss, not a scaled gradient)
    common = [*BITWISE, "--log_every", "1", "--precision", "fp16", "--fp16_init_scale", str(2.0 ** 24),
              "--max_steps", "16", "--checkpoint_every", "2", "--keep_last_n", "20", "--eval_every", "0"]
    proc = train(tiny_data, tmp_path, "straight", *common)
    assert "fp16 on CPU: float16 autocast and a loss scaler" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    overflows = [r["overflow_steps"] for r in train_rows]
    n = overflows[-1]
    assert overflows[:3] == [1, 2, 3] and n < 12, overflows  # then mostly clean steps
    assert all(b - a in (0, 1) for a, b in zip(overflows, overflows[1:])), overflows
    assert all(r["loss_scale"] == 2.0 ** (24 - r["overflow_steps"]) for r in train_rows)
    assert rows[-1]["type"] == "final" and rows[-1]["overflow_steps"] == n and rows[-1]["skipped_steps"] == 0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5  # it trains once the scale fits
    # the weights after two overflowing steps are the initial ones (those of a run at lr 0)
    train(tiny_data, tmp_path, "initial", *BITWISE, "--max_steps", "1", "--optim.lr", "0", "--checkpoint_every",
          "0", "--eval_every", "0")
    at_2 = load_file(tmp_path / "straight" / "checkpoints" / "step_0000002" / "model.safetensors")
    initial = weights(tmp_path / "initial")
    assert at_2.keys() <= initial.keys() and all((at_2[k] == initial[k]).all() for k in at_2)
    # the scaler's state is in every checkpoint: stopped while it is still lowering its scale, the
    # run resumes to the same losses, scales and weights
    assert n >= 3 and (tmp_path / "straight" / "checkpoints" / "step_0000002" / "scaler.pt").is_file()
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "2")
    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert "step_0000002 at step 2" in proc.stdout
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss_scale"], r["overflow_steps"]) for r in again if r["type"] == "train"] == \
        [(r["step"], r["loss_scale"], r["overflow_steps"]) for r in train_rows]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
