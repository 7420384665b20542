"""`make bench` runs in no test's time budget at full size: each benchmark runs here at toy size on
the tiny dataset, so that a change to lib or the scripts cannot break it unnoticed. The figures
themselves are machine-dependent and only checked for being figures."""
from __future__ import annotations

import json

from conftest import run_script

from lib.config import load_yaml


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


def test_bench_race_trains_ours_and_a_trainer_peer_for_the_same_budget_and_scores_both(tiny_data, tmp_path):
    # litgpt needs its own venv (make litgpt), which CI does not build: the race's other parts run here
    proc = run_script("scripts/bench_race.py", "--preset", "configs/train/smoke.yaml", "--data_dir", str(tiny_data),
                      "--out_dir", str(tmp_path), "--only", "ours,trainer_tuned", "--minutes", "0.15",
                      "--timing_steps", "14", "--eval_every", "5")
    out = json.loads((tmp_path / "race.json").read_text())
    assert set(out["results"]) == {"ours", "trainer_tuned"}
    ours, peer = out["results"]["ours"], out["results"]["trainer_tuned"]
    assert out["shared"]["shape"]["d_model"] == load_yaml(tmp_path / "ours" / "config.yaml")["model"]["d_model"]
    for r in (ours, peer):
        assert 0 < r["bits_per_byte"] < 20 and r["tokens_per_s"] > 0 and r["curve"]
        assert r["lzma_bits_per_byte"] == ours["lzma_bits_per_byte"]  # the same held-out bytes
    # the peer's steps were set from its timing run to fill the same budget (start-up included)
    assert peer["steps"] >= 1 and peer["train_s"] < 3 * 60 * 0.15 + 30
    assert (tmp_path / "trainer_tuned" / "final" / "config.json").is_file()
    assert "[race] trainer_tuned: step " in proc.stdout and "steps in the 0.15-minute budget" in proc.stdout
    assert "lower in bits per byte than the best peer setting (trainer_tuned" in proc.stdout
    assert (tmp_path / "race.png").stat().st_size > 10_000


def test_bench_race_refuses_an_unknown_entrant_and_a_missing_litgpt(tmp_path):
    proc = run_script("scripts/bench_race.py", "--only", "ours,nanogpt", "--out_dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "--only: unknown entrant 'nanogpt'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_script("scripts/bench_race.py", "--only", "litgpt_tuned", "--litgpt_python", str(tmp_path / "none"),
                      "--out_dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "make litgpt" in proc.stderr and not list(tmp_path.iterdir())


def test_the_litgpt_entrant_imports_the_standard_tokenize_not_the_script(tmp_path):
    # scripts/ holds tokenize.py; run as a script from there, torch's import of the standard
    # module would find it first. Here litgpt is absent, so the run gets as far as importing it.
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_race_litgpt.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "partially initialized module" not in proc.stderr
    assert "No module named 'litgpt'" in proc.stderr
