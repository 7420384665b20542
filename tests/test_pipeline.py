"""The main job at toy size, as real subprocesses: tokenize -> train -> eval, then load the
result with transformers' Auto classes."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script, train
from lib.files import sha256_file


@pytest.fixture(scope="module")
def smoke_run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # through `accelerate launch`, from another working directory, as a user would
    launcher = (str(Path(sys.executable).with_name("accelerate")), "launch",
                "--config_file", str(REPO / "configs/accelerate/cpu.yaml"))
    proc = train(tiny_data, runs, "smoke", "--max_steps", "80", "--eval_every", "40", "--checkpoint_every", "40",
                 "--log_every", "10", launcher=launcher, cwd=runs)
    return runs / "smoke", proc


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of the shared smoke run, for a test that extends or changes it (the others then
    see the run as it was made, whatever order the tests run in)."""
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def test_tokenized_data_is_consistent(tiny_data):
    manifest = json.loads((tiny_data / "tokens" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512
    assert manifest["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            assert sha256_file(tiny_data / "tokens" / shard["file"]) == shard["sha256"]
            tokens = np.load(tiny_data / "tokens" / shard["file"])
            docs = np.load(tiny_data / "tokens" / shard["docs_file"])
            assert docs[:, 0].sum() == len(tokens) == shard["tokens"]
            starts = np.concatenate([[0], np.cumsum(docs[:, 0])[:-1]])
            assert (tokens[starts] == 1).all() and (tokens[starts + docs[:, 0] - 1] == 2).all()


def _shard_docs_are_sentencepiece_ids(data: Path) -> int:
    """Check that every document of every token shard is `bos` + SentencePiece's ids + `eos`."""
    import sentencepiece as spm

    from lib.data.corpus import iter_records

    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer" / "sp.model"))
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    n = 0
    for split, info in manifest["splits"].items():
        tokens = np.concatenate([np.load(data / "tokens" / s["file"]) for s in info["shards"]])
        ends = np.cumsum(np.concatenate([np.load(data / "tokens" / s["docs_file"])[:, 0] for s in info["shards"]]))
        texts = [r["text"] for r in iter_records(data / "corpus", split)]
        assert len(texts) == len(ends)
        for text, start, end in zip(texts, np.concatenate([[0], ends[:-1]]), ends):
            assert tokens[start:end].tolist() == [1, *sp.encode(text), 2]
            n += 1
    return n


def test_token_shards_hold_sentencepiece_ids(tiny_data, tmp_path):
    """The shards are encoded through the word cache in worker processes (BPE), or by
    SentencePiece itself (unigram, which the cache cannot take): SentencePiece's ids either way."""
    assert _shard_docs_are_sentencepiece_ids(tiny_data) > 50
    out = tmp_path / "unigram"
    args = ("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(out), "--corpus.max_files",
            "30", "--tokenizer.model_type", "unigram", "--tokenizer.vocab_size")
    # (too small a vocabulary for the corpus's characters: SentencePiece's refusal, as a clear error)
    proc = run_script(*args, "300", check=False)
    assert proc.returncode == 2 and "Vocabulary size is smaller than required_chars" in proc.stderr
    assert "--tokenizer.vocab_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "tokenizer").exists() and not (out / "tokenizer.tmp").exists()
    proc = run_script(*args, "600")
    assert "tokens: encoded" in proc.stdout
    assert _shard_docs_are_sentencepiece_ids(out) > 10


def test_rerun_reuses_every_stage(tiny_data):
    proc = run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(tiny_data),
                      "--corpus.max_files", "80", "--tokenizer.vocab_size", "512")
    assert "tokenizer: unchanged" in proc.stdout and "tokens: unchanged" in proc.stdout


def test_training_loss_falls(smoke_run):
    run, proc = smoke_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert rows[0]["step"] == 10 and rows[-1]["step"] == 80
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert "loss" in proc.stdout and "tok/s" in proc.stdout


def test_run_folder_contents(smoke_run):
    run, _ = smoke_run
    for name in ["config.yaml", "provenance.json", "metrics.jsonl", "loss.png", "report.md", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "final/sp.model"]:
        assert (run / name).is_file(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["packages"]["torch"] and prov["data"]["tokens_content_hash"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_0000040", "step_0000080"], ckpts


def test_final_loads_with_auto_classes_and_generates(smoke_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = smoke_run
    model = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run / "final", local_files_only=True)
    import sentencepiece as spm

    # the Hugging Face tokenizer shipped in final/ gives SentencePiece's own ids after bos, as every
    # training document starts; a bos a client writes itself is bos, not the characters < s >
    sp = spm.SentencePieceProcessor(model_file=str(run / "final" / "sp.model"))
    assert tok("def ").input_ids == [tok.bos_token_id] + sp.encode("def ")
    assert tok(tok.bos_token + "def ", add_special_tokens=False).input_ids == tok("def ").input_ids
    assert tok.decode(tok(tok.bos_token + "ROMEO:", add_special_tokens=False).input_ids,
                      skip_special_tokens=True) == "ROMEO:"
    # plain generate(**tok(prompt)) conditions as training did
    enc = tok("def ", return_tensors="pt")
    ids = enc.input_ids
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    # greedy generation follows the saved weights: each new token is the argmax after the ones before
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[0]
    new = out[0, ids.shape[1]:]
    assert torch.equal(logits[ids.shape[1] - 1:].argmax(-1)[:len(new)], new)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("def") and len(text) > len("def ") and text == sp.decode(
        [i for i in out[0].tolist() if i not in tok.all_special_ids])
    # the tied output layer was saved and reloaded (not re-initialised)
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)


def test_eval_writes_all_sinks(smoke_run):
    import pyarrow.parquet as pq

    run, _ = smoke_run
    # a fresh process, as a user runs it (most tests call eval.py's main() inside pytest)
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "1", "--sample_tokens", "16",
                      fresh_process=True)
    for name in ["gzip", "bz2", "lzma", "bits/byte"]:
        assert name in proc.stdout
    out = run / "eval"
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["weights_sha256"] == sha256_file(run / "final" / "model.safetensors")  # what was scored
    tokens = json.loads((Path(json.loads((run / "provenance.json").read_text())["config"]["data"]["dir"]) / "tokens"
                         / "manifest.json").read_text())
    # the whole held-out split: every byte of its text, and bits per byte = nats per token in bits
    # times tokens over bytes; a model 80 steps in is clearly better than a uniform guess over the
    # vocabulary, and close to what the run's own last evaluation (a sample of the split) said
    assert rec["bytes"] == tokens["splits"]["val"]["text_bytes"] and rec["bytes"] > rec["tokens"] > 0
    assert rec["bits_per_byte"] == pytest.approx(rec["loss"] * rec["tokens"] / math.log(2) / rec["bytes"], rel=1e-9)
    assert rec["bits_per_byte"] < 0.85 * math.log2(tokens["vocab_size"]) * rec["tokens"] / rec["bytes"]
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    assert rec["loss"] == pytest.approx(last["val_loss"], rel=0.1)
    for k in ("gzip_bits_per_byte", "bz2_bits_per_byte", "lzma_bits_per_byte"):
        assert 0.5 < rec[k] < 8
    assert abs(rec["perplexity"] - np.exp(rec["loss"])) < 1e-6 * rec["perplexity"]
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    assert table[-1]["bits_per_byte"] == pytest.approx(rec["bits_per_byte"])
    assert "bits_per_byte" in (out / "metrics.csv").read_text().splitlines()[0]
    # the sample continues the opening words of a held-out document
    head, sample = (out / "samples.txt").read_text().split("\n", 1)
    prompt = head.split("(prompt ")[1].rsplit(", temperature", 1)[0]
    assert head.startswith("--- sample 0") and sample.startswith(eval(prompt)) and len(eval(prompt)) > 5


def test_existing_run_is_not_clobbered(smoke_run, tiny_data):
    run, _ = smoke_run
    before = sha256_file(run / "final" / "model.safetensors")
    proc = train(tiny_data, run.parent, run.name, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert sha256_file(run / "final" / "model.safetensors") == before


def test_resume_continues_from_the_last_checkpoint(smoke_run, tiny_data, tmp_path):
    run = copy_of(smoke_run[0], tmp_path)
    proc = train(tiny_data, tmp_path, run.name, "--resume", "auto", "--max_steps", "100", "--checkpoint_every", "40",
                 "--log_every", "10")
    assert "resumed from" in proc.stdout and "step_0000080" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps[-1] == 100 and steps.count(90) == 1


def test_audit_passes_then_names_a_corrupted_file(smoke_run, tiny_data, tmp_path):
    import shutil

    run, _ = smoke_run
    proc = run_script("scripts/audit.py", "--checks", "env", "data", "run", "--data", str(tiny_data),
                      "--run", str(run))
    assert "all checks passed" in proc.stdout and "[FAIL]" not in proc.stdout
    # flip one byte in a copy of the data and of a checkpoint
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "tokens" / "val-00000.npy"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    ckpt_file = run_copy / "checkpoints" / "step_0000080" / "model.safetensors"
    ckpt_file.write_bytes(ckpt_file.read_bytes()[:-10])
    proc = run_script("scripts/audit.py", "--checks", "data", "run", "--data", str(data), "--run", str(run_copy),
                      check=False)
    assert proc.returncode == 1
    assert "val-00000.npy" in proc.stdout and "model.safetensors is corrupt" in proc.stdout


def test_resume_on_other_data_is_refused_unless_allowed(smoke_run, tmp_path):
    run = copy_of(smoke_run[0], tmp_path)
    other = tmp_path / "other"
    run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(other),
               "--corpus.max_files", "70", "--tokenizer.vocab_size", "512")
    args = ("--resume", "auto", "--max_steps", "85")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = train(other, tmp_path, run.name, *args, check=False)
    assert proc.returncode == 2 and "trained on other data" in proc.stderr and "--allow_data_change" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    proc = train(other, tmp_path, run.name, *args, "--allow_data_change")
    assert "resuming anyway" in proc.stdout


def test_padded_training_reports_its_padding(tiny_data, tmp_path):
    from lib.data.batches import BlockSampler, DataConfig, build_train_data

    proc = train(tiny_data, tmp_path, "smoke", "--max_steps", "6", "--log_every", "3", "--eval_every", "0",
                 "--eval_tokens", "2000", "--data.packing", "pad_multiple", "--data.pad_multiple", "48")
    assert "padded (pad_multiple)" in proc.stdout and "| padding " in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    # the same batches rebuilt here: the logged padding and token counts are theirs
    data = build_train_data(tiny_data / "tokens", DataConfig(seq_len=64, packing="pad_multiple", pad_multiple=48),
                            {"pad": 3})
    sampler = BlockSampler(len(data), 8, seed=0)
    batches = [data.make_batch(sampler.next_batch()) for _ in range(6)]
    for record, window in zip(rows, (batches[:3], batches[3:])):
        pad = sum(b.n_padding for b in window) / sum(b.input_ids.size for b in window)
        assert record["padding"] == pytest.approx(pad)
    assert rows[-1]["tokens_seen"] == sum(b.n_targets for b in batches)


def test_report_shows_both_evaluations_and_bars_stay_quiet_in_a_log(smoke_run, tiny_data, tmp_path):
    """report.md holds the run's own evaluation (its fixed held-out sample) and eval.py's
    whole-split one, replaced (not repeated) by a second eval.py, in the precision the run trained
    in; an evaluation with other options or another output folder leaves the report alone; into a
    file or pipe, progress bars are drawn about once a minute, not on every batch or log line, and
    the libraries' own bars not at all."""
    run = copy_of(smoke_run[0], tmp_path)
    trained = json.loads((run / "provenance.json").read_text())["mixed_precision"]
    for _ in range(2):
        proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", env={"TQDM_DISABLE": ""})
    assert 1 <= proc.stderr.count("eval:") <= 3, proc.stderr
    assert "(its provenance.json)" in proc.stdout and "GFLOP/s" not in proc.stdout  # no bf16/fp32 timing
    rec = json.loads((run / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["precision"] == {"no": "fp32"}.get(trained, trained)
    report = (run / "report.md").read_text()
    assert report.count("## Held-out evaluation by eval.py (val)") == 1
    assert "held-out, " in report and "the sample every evaluation of the run scores" in report
    line = next(x for x in report.splitlines() if "bits/byte **" in x)
    assert f"**{rec['bits_per_byte']:.4f}**" in line and "lzma -9e" in line
    for other in (["--out_dir", str(tmp_path / "ev")], ["--stride", "32"]):
        proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", *other)
        assert (run / "report.md").read_text() == report, other
        assert f"not the run's own evaluation ({' '.join(other)})" in proc.stdout
    # a process of its own: the libraries' bars and log lines go to its real stderr
    proc = train(tiny_data, tmp_path, "quiet", "--max_steps", "40", "--log_every", "1", "--eval_every", "0",
                 "--checkpoint_every", "20", env={"TQDM_DISABLE": ""}, fresh_process=True)
    assert sum(x.startswith("step ") for x in proc.stdout.splitlines()) == 40
    assert 1 <= proc.stderr.count("train:") <= 3, proc.stderr
    # transformers' weight-writing bar is off into a log, and Accelerate's note on the tied output
    # embedding (dropped on save, rebuilt on load) is not repeated at every checkpoint
    assert "Writing model shards" not in proc.stderr and "Removed shared tensor" not in proc.stderr + proc.stdout


def test_system_metrics_interval_and_bad_metrics_format(tiny_data, tmp_path):
    """--monitor.every N samples the system figures on every Nth log line, 0 never; an unknown
    --metrics_out format is refused before the run folder is made."""
    common = ("--max_steps", "4", "--log_every", "1", "--eval_every", "0", "--checkpoint_every", "0")
    train(tiny_data, tmp_path, "every2", *common, "--monitor.every", "2")
    rows = [json.loads(x) for x in (tmp_path / "every2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sys_rss_gib" in r] == [2, 4]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    proc = train(tiny_data, tmp_path, "off", *common, "--monitor.every", "0")
    assert "system metrics: off (--monitor.every 0)" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("sys_") for r in rows for k in r)
    assert not (tmp_path / "off" / "metrics.csv").exists()  # ndjson only, by default
    proc = train(tiny_data, tmp_path, "bad", *common, "--metrics_out", "ndjson,xml", check=False)
    assert proc.returncode != 0 and "--metrics_out ndjson,xml: unknown format 'xml'" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_one_text_file_from_tokenize_to_eval(tmp_path):
    """A single plain-text file (here ~300 KB of Python's own documentation, which every machine
    has) as a user's corpus: split into documents, some held out, trained on, evaluated."""
    from pydoc_data.topics import topics

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(topics[k] for k in sorted(topics))[:300_000], encoding="utf-8")
    data = tmp_path / "data"
    run_script("scripts/tokenize.py", "--corpus.source", str(book), "--out_dir", str(data),
               "--tokenizer.vocab_size", "512")
    manifest = json.loads((data / "corpus" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["records"] >= 1 and manifest["splits"]["train"]["records"] > 20
    train(data, tmp_path, "book", "--max_steps", "60", "--eval_every", "0", "--eval_tokens", "4000",
          "--checkpoint_every", "0")
    proc = run_script("scripts/eval.py", "--model", str(tmp_path / "book"), "--samples", "0")
    rec = json.loads((tmp_path / "book" / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["bytes"] == manifest["splits"]["val"]["text_bytes"] and "bits/byte" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "book" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert losses[-1] < losses[0] and losses[-1] < math.log(512) - 1.0  # it learned the text


def test_eval_finds_a_runs_data_from_another_folder_or_asks_for_it(smoke_run, tiny_data, tmp_path):
    import yaml

    run = copy_of(smoke_run[0], tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["dir"] = "data/tiny"  # as given on a command line run elsewhere
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", "--max_tokens", "2000", cwd=elsewhere)
    assert str(tiny_data) in proc.stdout  # the absolute path the run recorded
    prov = json.loads((run / "provenance.json").read_text())
    prov["data"]["dir"] = str(tmp_path / "moved")
    (run / "provenance.json").write_text(json.dumps(prov))
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", cwd=elsewhere, check=False)
    assert proc.returncode == 2 and "--data" in proc.stderr and "data/tiny" in proc.stderr, proc.stderr
