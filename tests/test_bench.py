"""`make bench` runs in no test's time budget at full size: each benchmark runs here at toy size on
the tiny dataset, so that a change to lib or the scripts cannot break it unnoticed. The figures
themselves are machine-dependent and only checked for being figures."""
from __future__ import annotations

import json

from conftest import run_script


def test_bench_train_compares_every_configuration_and_plots(tiny_data, tmp_path):
    proc = run_script("scripts/bench_train.py", "--preset", "configs/train/smoke.yaml", "--data_dir", str(tiny_data),
                      "--out_dir", str(tmp_path), "--steps", "4", "--warmup", "1", "--rounds", "1")
    out = json.loads((tmp_path / "train.json").read_text())
    assert set(out["results"]) == {"trainer_defaults", "trainer_careful", "ours_default", "ours_same_as_a",
                                   "ours_fp32", "ours_bf16", "llama_3x192", "gpt_3x192"}
    for name, res in out["results"].items():
        assert res["tokens_per_s"] > 0 and res["share_of_peak"] > 0, name
    assert out["results"]["ours_default"]["dtype"] in ("fp32", "bf16")
    assert out["results"]["ours_bf16"]["dtype"] == "bf16" and out["results"]["ours_fp32"]["dtype"] == "fp32"
    assert set(out["ratios"]) == set(out["ceilings"]) == {
        "ours_default / trainer_defaults", "ours_default / trainer_careful", "ours_same_as_a / trainer_defaults",
        "gpt_3x192 / llama_3x192"}
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[bench] gpt_3x192 / llama_3x192 "))
    assert "(target >= 1.0x:" in line
    assert (tmp_path / "runs" / "gpt_3x192" / "final" / "export.json").is_file()  # the own model ran
    for key, ratio in out["ratios"].items():
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"[bench] {key} "))
        assert f"{ratio:5.2f}x median of" in line and "ceiling" in line
    # 3x against the Trainer's fp32 where auto trains in bf16; 1.4x where fp32 is the fast path
    target = 3.0 if out["results"]["ours_default"]["dtype"] == "bf16" else 1.4
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[bench] ours_default / trainer_defaults "))
    assert f"(target >= {target}x:" in line
    assert (tmp_path / "train.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "ours_default" / "provenance.json").is_file()


def test_bench_tokenize_checks_ids_and_plots_memory(tiny_data, tmp_path):
    proc = run_script("scripts/bench_tokenize.py", "--data", str(tiny_data), "--out_dir", str(tmp_path),
                      "--rounds", "1", "--gen_gb", "0.002")
    out = json.loads((tmp_path / "tokenize.json").read_text())
    # our encode and the Hugging Face tokenizer give the same ids, in both output formats
    assert out["throughput"]["npy"]["identical_ids"] and out["throughput"]["jsonl"]["identical_ids"]
    assert out["throughput"]["npy"]["mb_s"] > 0 and out["memory"]["peak_rss_mib"] > 0
    assert (tmp_path / "encode_memory.png").stat().st_size > 10_000
    assert not (tmp_path / "generated.jsonl").exists()  # deleted unless --keep_generated
    assert "[bench] results ->" in proc.stdout
    proc = run_script("scripts/bench_tokenize.py", "--data", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path),
                      check=False)
    assert proc.returncode != 0 and "has no tokenizer" in proc.stderr and "Traceback" not in proc.stderr
