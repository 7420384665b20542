"""lib units against references: schedules, sampler order, eval reductions, loss weighting."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lib.data.batches import BlockSampler, TokenBlocks, gather_docs, sample_docs
from lib.errors import UserError
from lib.model.evaluate import compressor_bpb, stream_blocks, summarize
from lib.model.loss import IGNORE_INDEX, step_scaled_loss, token_loss_sum
from lib.train.optim import OptimConfig, lr_at


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))


def test_warmup_as_a_share_of_the_schedule_scales_with_it():
    from lib.train.optim import warmup_steps

    cfg = OptimConfig(lr=1.0, warmup_steps=50, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert warmup_steps(1000, cfg) == 100 and warmup_steps(30, cfg) == 3 and warmup_steps(4, cfg) == 1
    # a 30-step schedule (50 fixed warmup steps would never end) warms up in 3, then decays to the floor
    lrs = [lr_at(s, 30, cfg) for s in range(30)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(99, 1000, cfg) == pytest.approx(1.0)  # the 100th of 100 warmup steps


@pytest.mark.parametrize("schedule", ["linear", "constant", "wsd"])
def test_other_schedules_end_where_they_should(schedule):
    cfg = OptimConfig(lr=2.0, warmup_steps=5, min_lr_ratio=0.25, schedule=schedule, decay_fraction=0.5)
    last = lr_at(99, 100, cfg)
    assert last == pytest.approx(2.0 if schedule == "constant" else 0.5)
    if schedule == "wsd":
        assert lr_at(40, 100, cfg) == pytest.approx(2.0)  # still in the stable phase


def test_sampler_is_deterministic_and_resumable():
    a = BlockSampler(1000, 8, seed=3)
    first = [a.next_batch() for _ in range(200)]  # crosses an epoch boundary (125 batches)
    b = BlockSampler(1000, 8, seed=3)
    for _ in range(77):
        b.next_batch()
    c = BlockSampler(1000, 8, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(123)] == first[77:]
    assert sorted(i for batch in first[:125] for i in batch) == list(range(1000))  # an epoch is a permutation
    assert first[125:] != first[:75]  # the next epoch is reshuffled
    assert BlockSampler(1000, 8, seed=4).next_batch() != first[0]


def test_sampler_ranks_partition_the_epoch():
    ranks = [BlockSampler(64, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [i for s in ranks for _ in range(s.batches_per_epoch) for i in s.next_batch()]
    assert sorted(seen) == list(range(64))
    with pytest.raises(UserError, match="micro_batch_size"):
        BlockSampler(3, 4, seed=0)


def test_blocks_over_shards_stay_inside_each_shard():
    a, b = np.arange(0, 25, dtype=np.uint16), np.arange(100, 131, dtype=np.uint16)
    blocks = TokenBlocks([a, b], 10)
    assert len(blocks) == 2 + 3 and blocks.n_tokens == 56
    out = blocks.batch([0, 1, 2, 4])
    assert out.dtype == np.int64
    assert out[:, 0].tolist() == [0, 10, 100, 120] and out[:, -1].tolist() == [10, 20, 110, 130]
    with pytest.raises(UserError, match="no shard holds one block"):
        TokenBlocks([a[:5], b[:5]], 10)


def test_blocks_cover_the_stream():
    tokens = np.arange(101)
    blocks = TokenBlocks(tokens, 10)
    assert len(blocks) == 10
    b = blocks.batch([0, 9])
    assert b.shape == (2, 11) and b[0, -1] == 10 and b[1, 0] == 90 and b[1, -1] == 100


@pytest.mark.parametrize("n, seq_len, stride", [(23, 5, None), (23, 5, 2), (23, 5, 5), (6, 5, 1), (4, 8, 3),
                                                (101, 10, 7), (2, 5, None)])
def test_stream_blocks_predict_every_token_once(n, seq_len, stride):
    tokens = np.arange(1, n + 1)  # n tokens -> n - 1 targets: 2..n
    inputs, targets = stream_blocks(tokens, seq_len, stride)
    scored = targets[targets != IGNORE_INDEX]
    assert sorted(scored.tolist()) == list(range(2, n + 1))
    # each target is predicted from the token right before it
    rows, cols = np.nonzero(targets != IGNORE_INDEX)
    assert (inputs[rows, cols] == targets[rows, cols] - 1).all()
    if stride and stride < seq_len and n > seq_len + 1:
        # apart from the first window, every scored target sees >= seq_len - stride tokens of context
        assert cols[rows > 0].min() >= seq_len - stride - 1


def test_summarize_bits_per_byte():
    sums = {"loss_sum": 100 * math.log(2), "targets": 50, "correct": 10}
    out = summarize(sums, text_bytes=200)
    assert out["bits_per_byte"] == pytest.approx(0.5)
    assert out["loss"] == pytest.approx(2 * math.log(2)) and out["perplexity"] == pytest.approx(4.0)
    assert out["accuracy"] == pytest.approx(0.2)


def test_sample_docs_draws_whole_documents_from_across_the_split():
    rng = np.random.default_rng(1)
    docs = np.stack([rng.integers(5, 50, 400), rng.integers(20, 200, 400)], axis=1)
    assert (sample_docs(docs, None) == np.arange(400)).all()
    assert (sample_docs(docs, int(docs[:, 0].sum())) == np.arange(400)).all()  # the split is that small
    idx = sample_docs(docs, 1000, seed=0)
    assert (np.diff(idx) > 0).all()  # ascending, no repeats
    assert docs[idx, 0].sum() >= 1000 and docs[idx[:-1], 0].sum() < 1000 + docs[:, 0].max()
    assert idx[-1] > 200 and idx[0] < 200 and not (idx == np.arange(len(idx))).all()  # not a prefix
    assert (sample_docs(docs, 1000, seed=0) == idx).all()  # the same sample every time
    assert not np.array_equal(sample_docs(docs, 1000, seed=1), idx)
    tokens = np.arange(int(docs[:, 0].sum()))
    stream, n_bytes = gather_docs(tokens, docs, idx)
    starts = np.concatenate([[0], np.cumsum(docs[:, 0])[:-1]])
    expected = np.concatenate([tokens[starts[i]: starts[i] + docs[i, 0]] for i in idx])
    assert (stream == expected).all() and n_bytes == docs[idx, 1].sum()

def test_compressors_rank_as_expected():
    rng = np.random.default_rng(0)
    text = ("def f(x):\n    return x + 1\n" * 200).encode() + rng.integers(97, 123, 2000, dtype=np.uint8).tobytes()
    bpb = compressor_bpb(text)
    assert set(bpb) == {"gzip", "bz2", "lzma"}
    # the 2,000 random letters alone hold 2000 * log2(26) bits: no compressor goes below that, and
    # the 200 repeated lines cost next to nothing, so each lands just above it
    floor = 2000 * np.log2(26) / len(text)
    assert all(floor < v < 1.3 * floor for v in bpb.values()), (floor, bpb)
    assert compressor_bpb(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())["lzma"] > 7.9


def test_token_weighting_matches_one_big_batch():
    """Uneven padding: accumulating token-weighted micro-batch losses gives the gradient of the
    whole batch, where averaging per-micro-batch means does not."""
    import torch

    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(2, 8, 6)
    y = torch.randint(0, 5, (2, 8))
    y[0, 2:] = IGNORE_INDEX  # micro-batch 0 has 2 targets, micro-batch 1 has 8
    full_sum, n = token_loss_sum(x @ w, y)
    (g_ref,) = torch.autograd.grad(full_sum / n, w)
    g = torch.zeros_like(w)
    g_naive = torch.zeros_like(w)
    for i in range(2):
        s, k = token_loss_sum(x[i : i + 1] @ w, y[i : i + 1])
        # what accelerator.backward does with accumulation 2: divide by 2
        g += torch.autograd.grad(step_scaled_loss(s, int(n), world_size=1, accum_steps=2) / 2, w,
                                 retain_graph=True)[0]
        g_naive += torch.autograd.grad((s / k) / 2, w)[0]
    torch.testing.assert_close(g, g_ref)
    assert not torch.allclose(g_naive, g_ref, atol=1e-4)


def test_keep_freed_memory_applies_on_linux():
    import sys

    from lib.train.cpu import keep_freed_memory

    assert keep_freed_memory() is sys.platform.startswith("linux")


def test_matmul_probe_measures_something_plausible():
    from lib.train.flops import measure_matmul_peak

    peak = measure_matmul_peak("fp32", size=256, seconds=0.2)
    assert 1e8 < peak < 1e15


def test_fit_micro_batch_halves_on_cpu_keeping_the_step(tmp_path):
    """Trial steps that take 100 MB per sequence, 500 MB free: 16 sequences become 4 x 4, even
    though the process peaked higher (400 MB) before the trials."""
    import subprocess
    import sys

    from conftest import REPO

    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import numpy as np, torch
from lib.train import memory
memory.available_memory = lambda: 500 * 2**20
def trial(n):
    x = np.ones(n * 100 * 2**20 // 8)  # touched, so resident
    del x
earlier = np.ones(400 * 2**20 // 8); del earlier  # an earlier, higher peak
print(memory.fit_micro_batch(trial, 16, 1, torch.device("cpu"), say=lambda m: print("say:", m)))
print(memory.fit_micro_batch(lambda n: None, 16, 2, torch.device("cpu"), say=print))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-2] == "(4, 4)" and lines[-1] == "(16, 2)"  # nothing to fit: unchanged
    assert sum(line.startswith("say: micro_batch_size") for line in lines) == 2


def test_matmul_probe_leaves_the_global_random_state_alone():
    import torch

    from lib.train.flops import measure_matmul_peak

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    measure_matmul_peak("fp32", size=64, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


def test_fp16_on_cpu_gives_autocast_and_a_scaler_only_when_asked():
    import subprocess
    import sys

    # each Accelerator setting needs its own process (Accelerate keeps one global state)
    code = """
import sys; sys.path.insert(0, {repo!r})
import torch
from accelerate import Accelerator
from lib.model.build import fp16_on_cpu
a = Accelerator(mixed_precision={mp!r}, cpu=True)
print(a.native_amp, fp16_on_cpu(a, {scale!r}))
with a.autocast():
    print((torch.ones(2, 2) @ torch.ones(2, 2)).dtype, a.scaler is not None and a.scaler.get_scale())
"""
    from conftest import REPO

    def run(mp, scale):
        out = subprocess.run([sys.executable, "-c", code.format(repo=str(REPO), mp=mp, scale=scale)],
                             capture_output=True, text=True, check=True).stdout.split()
        return out

    # Accelerate alone runs "fp16" on CPU in fp32: no autocast, no scaler
    assert run("fp16", 1024.0) == ["False", "True", "torch.float16", "1024.0"]
    assert run("fp16", None) == ["False", "True", "torch.float16", "False"]  # evaluation: no scaler
    assert run("bf16", 1024.0) == ["True", "False", "torch.bfloat16", "False"]  # not fp16: untouched


def test_held_out_sample_is_evals_windows_with_exact_bytes(tiny_data):
    """The in-training evaluation scores a seeded sample of exactly the windows eval.py scores
    over the whole split, and knows the bytes of the text its targets encode."""
    from lib.data.batches import load_split
    from lib.model.evaluate import IGNORE_INDEX, held_out_sample, stream_blocks, token_byte_lengths

    tokens, docs = load_split(tiny_data / "tokens", "val")
    lengths = token_byte_lengths(tiny_data / "tokenizer" / "sp.model")
    ends = np.cumsum(docs[:, 0])
    assert [int(lengths[tokens[e - n: e]].sum()) for n, e in zip(docs[:, 0], ends)] == docs[:, 1].tolist()
    full_in, full_tg = stream_blocks(tokens, 64, 32)
    whole = held_out_sample(tokens, docs, 64, None, lengths)
    assert (whole.inputs == full_in).all() and whole.text_bytes == docs[:, 1].sum()
    sample = held_out_sample(tokens, docs, 64, 2000, lengths, seed=0)
    rows = {r.tobytes(): i for i, r in enumerate(full_in)}
    index = [rows[r.tobytes()] for r in sample.inputs]  # every sampled window is one of eval.py's
    assert index[-1] > len(full_in) // 2 and index[0] < len(full_in) // 2  # from across the split
    assert all((full_tg[rows[r.tobytes()]] == t).all() for r, t in zip(sample.inputs, sample.targets))
    scored = sample.targets[sample.targets != IGNORE_INDEX]
    assert abs(len(scored) - 2000) < 64 and sample.text_bytes == lengths[scored].sum()
    assert "evenly spaced across" in sample.description
    gaps = np.diff(index)  # evenly spaced: no stretch of the split left out
    assert gaps.max() <= 2 * len(full_in) / len(index) + 1
    assert (held_out_sample(tokens, docs, 64, 2000, lengths, seed=0).inputs == sample.inputs).all()
    # byte lengths that do not add up (another tokenizer): whole documents, whose bytes are recorded
    docs_sample = held_out_sample(tokens, docs, 64, 2000, lengths + 1, seed=0)
    assert "held-out documents" in docs_sample.description
    assert docs_sample.text_bytes in {int(docs[sample_docs(docs, 2000, 0), 1].sum())}


def test_loop_state_saves_every_process_window_and_restores_each_its_own():
    import torch

    from lib.train.loop_state import LoopState

    ranks = [LoopState(horizon=100) for _ in range(2)]
    for rank, loop in enumerate(ranks):
        loop.step, loop.tokens_seen, loop.skipped_steps = 6, 4096, 1
        loop.window.loss += torch.tensor(1.0 + rank / 3, dtype=torch.float32)  # not exact in decimal
        loop.window.tokens, loop.window.slots, loop.window.pad = 2048, 512 + rank, rank
        loop.last_eval.update(step=6, loss=2.5)
    # what gather_object gives every process: each process's list, in process order
    windows = [w for loop in ranks for w in loop.state_dict(lambda items: items)["log_windows"]]
    saved = {**ranks[0].state_dict(lambda items: items), "log_windows": windows}
    assert saved["step"] == 6 and saved["val_loss"] == 2.5 and saved["clock"] is None
    saved = json.loads(json.dumps(saved))  # as trainer_state.json holds it
    for rank, original in enumerate(ranks):
        restored = LoopState(horizon=100)
        restored.load_state_dict(saved, process_index=rank)
        assert torch.equal(restored.window.loss, original.window.loss)  # bit for bit
        assert (restored.window.slots, restored.window.pad) == (original.window.slots, original.window.pad)
        assert (restored.step, restored.tokens_seen, restored.skipped_steps) == (6, 4096, 1)
    # a process the checkpoint has no window for starts an empty one
    extra = LoopState(horizon=100)
    extra.load_state_dict(saved, process_index=2)
    assert float(extra.window.loss) == 0 and extra.window.slots == 0
    # a schedule on a budget's clock comes back where it was, with the time the run had spent
    from lib.train.budget import ClockSchedule

    ranks[0].clock = ClockSchedule(150.0, 1000, start_s=4.0, progress=0.37, warm_end=0.05)
    again = LoopState(horizon=100, clock=ClockSchedule(150.0, 1000))
    again.load_state_dict(json.loads(json.dumps(ranks[0].state_dict(lambda items: items))), 0)
    assert (again.clock.start_s, again.clock.progress, again.clock.warm_end) == (4.0, 0.37, 0.05)
    assert again.elapsed_s() >= ranks[0].elapsed_before_s and not again.done
    # a checkpoint of a horizon fitted in steps (before the clock) keeps that horizon
    old_style = {**ranks[0].state_dict(lambda items: items), "clock": None, "fitted_horizon": 37}
    legacy = LoopState(horizon=100, clock=ClockSchedule(150.0, 1000))
    legacy.load_state_dict(old_style, 0)
    assert legacy.horizon == 37 and legacy.clock is None


def test_peak_memory_follows_what_the_process_holds():
    import mmap

    import numpy as np
    import psutil
    import torch

    from lib.records.monitor import peak_memory_gib

    # this process may have held more before (runs inside it): go 1 GiB above its peak so far, in
    # fresh pages from the kernel (malloc could reuse memory freed earlier and still resident)
    held = psutil.Process().memory_info().rss / 2**30
    earlier_peak = peak_memory_gib(torch.device("cpu"))[0]
    size = int((max(earlier_peak - held, 0) + 1) * 2**30)
    with mmap.mmap(-1, size) as block:
        np.frombuffer(block, dtype=np.uint8)[:] = 1  # every page written
        peak, what = peak_memory_gib(torch.device("cpu"))
    assert what == "process RSS" and peak >= earlier_peak + 0.9, (held, earlier_peak, size, peak)


def test_system_monitor_samples_cpu_and_memory_and_degrades_without_psutil(monkeypatch):
    import sys

    import torch

    from lib.records.monitor import SystemMonitor

    monitor = SystemMonitor(torch.device("cpu"))
    assert monitor.describe() == "CPU and memory (psutil)"
    sum(range(2_000_000))  # some CPU time for the interval
    got = monitor.sample()
    assert set(got) == {"sys_cpu_percent", "sys_process_cpu_percent", "sys_memory_percent", "sys_rss_gib"}
    assert 0 <= got["sys_cpu_percent"] <= 100 and 0 < got["sys_memory_percent"] < 100 and got["sys_rss_gib"] > 0.01
    assert got["sys_process_cpu_percent"] > 0

    # a source that fails mid-run is dropped with its reason, and sampling goes on
    def broken():
        raise OSError("gone")

    monkeypatch.setattr(monitor._process, "memory_info", broken)
    assert monitor.sample() == {} and "CPU and memory: stopped (OSError)" in monitor.describe()

    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    monitor = SystemMonitor(torch.device("cpu"))
    assert monitor.sample() == {} and monitor.describe() == "none; CPU and memory: unavailable (ModuleNotFoundError)"


def test_system_monitor_reads_the_gpu_through_nvml_and_drops_what_fails(monkeypatch):
    import sys
    import types

    import torch

    from lib.records.monitor import SystemMonitor

    class NotSupported(Exception):
        pass

    opened = []
    nvml = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: opened.append(i) or f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: (_ for _ in ()).throw(NotSupported()),  # some boards cannot
        nvmlDeviceGetTemperature=lambda h, sensor: 61)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # torch's cuda:1 is NVML's GPU 5
    monitor = SystemMonitor(torch.device("cuda", 1))
    assert opened == [5]
    got = monitor.sample()
    assert {k: v for k, v in got.items() if k.startswith("gpu")} == {
        "gpu_utilization_percent": 87.0, "gpu_memory_gib": 3.0, "gpu_temperature_c": 61.0}
    assert "gpu_power_w: stopped (NotSupported)" in monitor.describe() and "sys_rss_gib" in got

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(nvml, "nvmlInit", no_driver)
    monitor = SystemMonitor(torch.device("cuda", 0))
    assert "GPU: unavailable (RuntimeError)" in monitor.describe()
    assert not [k for k in monitor.sample() if k.startswith("gpu")]


def test_flops_per_token_charges_a_frozen_weight_no_gradient():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lib.model.lora import LoraOptions, apply
    from lib.model.build import flops_per_token

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied: once
    attention = 12 * 2 * 32 * 16
    assert flops_per_token(model, 16) == 6 * weights + attention
    adapted = apply(model, LoraOptions(r=4))
    adapters = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    assert adapters > 0 and flops_per_token(adapted, 16) == 4 * weights + 6 * adapters + attention
