"""lib/model/gpt.py, the project's own model: with the default options it is a Llama weight for
weight (and with QK-norm a Qwen3), packed documents attend within themselves, generation works."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from lib.model.gpt import GPT, GPTConfig, standard_config


def tiny(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         **options)).eval()


@pytest.mark.parametrize("options, arch", [({}, "LlamaForCausalLM"), ({"qk_norm": True}, "Qwen3ForCausalLM"),
                                           ({"tie_embeddings": False}, "LlamaForCausalLM")])
def test_the_standard_architecture_computes_the_same_logits_from_the_same_weights(options, arch):
    ours = tiny(**options)
    theirs = AutoModelForCausalLM.from_config(standard_config(ours.config), dtype=torch.float32).eval()
    assert type(theirs).__name__ == arch
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)  # tied: one tensor
    ids = torch.randint(0, 97, (2, 24))
    packed = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two documents per row
    with torch.no_grad():
        for kind in ("sdpa", "eager"):  # torch's fused kernel, and attention written out
            ours.set_attention(kind)
            for kwargs in ({}, {"position_ids": packed}):
                a, b = ours(ids, use_cache=False, **kwargs).logits, theirs(ids, use_cache=False, **kwargs).logits
                assert (a - b).abs().max() < 1e-5, (kind, kwargs, (a - b).abs().max())


def test_a_packed_document_sees_nothing_of_the_one_before():
    model = tiny()
    ids = torch.randint(0, 97, (1, 20))
    other = ids.clone()
    other[0, :8] = torch.randint(0, 97, (8,))  # a different first document
    positions = torch.cat([torch.arange(8), torch.arange(12)])[None]
    with torch.no_grad():
        a = model(ids, position_ids=positions).logits[0, 8:]
        b = model(other, position_ids=positions).logits[0, 8:]
        alone = model(ids[:, 8:]).logits[0]
    assert (a - b).abs().max() < 1e-5 and (a - alone).abs().max() < 1e-5


@pytest.mark.parametrize("options", [{}, {"mlp": "relu2"}, {"logit_softcap": 15.0}, {"qk_norm": True}])
def test_greedy_generation_with_the_cache_continues_as_full_forward_passes_do(options):
    model = tiny(**options)
    model.set_attention("eager" if options else "sdpa")
    prompt = torch.randint(0, 97, (1, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_options_without_a_standard_layout_are_named():
    for options, words in (({"mlp": "relu2"}, "mlp relu2"), ({"logit_softcap": 30.0}, "logit_softcap 30")):
        with pytest.raises(ValueError, match=words):
            standard_config(tiny(**options).config)
    assert tiny(logit_softcap=2.0)(torch.randint(0, 97, (1, 6))).logits.abs().max() < 2.0


@pytest.mark.parametrize("options", [(), ("--model.qk_norm",), ("--model.mlp", "relu2"),
                                     ("--model.logit_softcap", "15", "--model.no_tie_embeddings")],
                         ids=["default", "qk_norm", "relu2", "softcap_untied"])
def test_each_option_trains_and_resumes_bit_for_bit(tiny_data, tmp_path, options):
    from conftest import BITWISE, train
    from test_resume import assert_same_run

    common = (*BITWISE, "--model.arch", "gpt", *options, "--max_steps", "8", "--log_every", "1",
              "--eval_every", "4", "--checkpoint_every", "4")
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "4")
    train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_the_default_options_export_a_llama_and_the_others_the_projects_own_format(tiny_data, tmp_path):
    import json

    from conftest import run_script, train

    quick = ("--model.arch", "gpt", "--max_steps", "6", "--eval_every", "0", "--checkpoint_every", "0",
             "--eval_tokens", "2000", "--precision", "fp32")
    proc = train(tiny_data, tmp_path, "llama", *quick)
    final = tmp_path / "llama" / "final"
    assert "exported as LlamaForCausalLM" in proc.stdout
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((final / "export.json").read_text())["max_abs_logit_diff"] <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)  # no import of this project's code
    assert type(plain).__name__ == "LlamaForCausalLM"
    proc = train(tiny_data, tmp_path, "relu2", *quick, "--model.mlp", "relu2")
    own = tmp_path / "relu2" / "final"
    assert "in this project's own format (mlp relu2" in proc.stdout
    assert json.loads((own / "config.json").read_text())["model_type"] == "lm_repo_gpt"
    out = run_script("scripts/eval.py", "--model", str(tmp_path / "relu2"), "--samples", "1").stdout
    assert "bits/byte" in out


def test_a_copy_of_the_model_file_trains_and_its_final_model_is_read_with_it_unchanged(tiny_data, tmp_path):
    """--model.file: a researcher's copy of lib/model/gpt.py with one line changed (GELU for SiLU
    in the gate) is what trains; its final/ cannot be a Llama (other logits on the same weights), so
    it is written in the own format naming the file, eval.py scores it with that file, and refuses
    once the file has changed."""
    import json
    import shutil
    import sys

    from conftest import REPO, run_script, train

    mine = tmp_path / "mine" / "gpt.py"
    mine.parent.mkdir()
    shutil.copy(REPO / "lib" / "model" / "gpt.py", mine)
    source = mine.read_text()
    mine.write_text(source.replace("F.silu(self.gate_proj(x))", "F.gelu(self.gate_proj(x))"))
    quick = ("--model.arch", "gpt", "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "0",
             "--eval_tokens", "2000", "--precision", "fp32")
    proc = train(tiny_data, tmp_path, "forked", *quick, "--model.file", str(mine))
    final = tmp_path / "forked" / "final"
    assert "in this project's own format (its logits differ from a LlamaForCausalLM's" in proc.stdout
    record = json.loads((final / "export.json").read_text())
    assert record["model_file"] == str(mine.resolve()) and record["format"] == "lm_repo_gpt"
    out = run_script("scripts/eval.py", "--model", str(tmp_path / "forked"), "--samples", "0", "--no_tracking").stdout
    bpb = next(float(line.split()[1]) for line in out.splitlines() if line.strip().startswith("bits/byte"))
    from lib.model.build import load_pretrained

    loaded = load_pretrained(final)
    assert sys.modules[type(loaded).__module__].__file__ == str(mine.resolve())
    mine.write_text(source)  # the file changed after training: the weights are not read with other code
    refused = run_script("scripts/eval.py", "--model", str(tmp_path / "forked"), "--samples", "0", "--no_tracking",
                         check=False)
    assert refused.returncode != 0 and "which has changed since" in refused.stderr
    assert "Traceback" not in refused.stderr and bpb > 0
    # the same file unchanged is the project's model: a Llama
    shutil.copy(REPO / "lib" / "model" / "gpt.py", mine)
    assert "exported as LlamaForCausalLM" in train(tiny_data, tmp_path, "copy", *quick, "--model.file", str(mine)).stdout


def test_the_export_check_fails_when_a_weight_is_mapped_wrong(monkeypatch):
    from lib.model import export, gpt

    model = tiny()
    right = gpt.to_standard

    def swapped(m, state_dict=None):  # two layers' query weights exchanged
        standard = right(m, state_dict)
        layers = standard.model.layers
        a, b = layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight
        with torch.no_grad():
            tmp = a.clone()
            a.copy_(b)
            b.copy_(tmp)
        return standard

    assert export.as_standard(model)[2]["max_abs_logit_diff"] <= 1e-4
    monkeypatch.setattr(gpt, "to_standard", swapped)
    with pytest.raises(RuntimeError, match="a weight is mapped wrong"):
        export.as_standard(model)


def test_lora_and_fsdp2_on_the_projects_own_model(tiny_data, tmp_path):
    """LoRA on a model saved in the project's own format (its merge checked against base + adapter
    as for any base), and FSDP2 over two CPU processes sharding its blocks, exported as a Llama."""
    import json

    from conftest import accelerate_launch, train

    quick = ("--max_steps", "6", "--eval_every", "0", "--eval_tokens", "2000", "--precision", "fp32")
    train(tiny_data, tmp_path, "base", *quick, "--checkpoint_every", "0", "--model.arch", "gpt", "--model.mlp", "relu2")
    proc = train(tiny_data, tmp_path, "lora", *quick, "--checkpoint_every", "0",
                 "--model.init_from", str(tmp_path / "base" / "final"), "--lora.r", "4")
    assert "LoRA r=4" in proc.stdout and "q_proj" in proc.stdout
    merged = json.loads((tmp_path / "lora" / "final" / "export.json").read_text())
    assert merged["max_abs_logit_diff"] <= 1e-3
    proc = train(tiny_data, tmp_path, "fsdp", *quick, "--checkpoint_every", "3", "--model.arch", "gpt",
                 launcher=accelerate_launch("cpu_fsdp2"))
    assert "sharded" in proc.stdout and "exported as LlamaForCausalLM" in proc.stdout
    assert (tmp_path / "fsdp" / "checkpoints" / "step_0000006" / "pytorch_model_fsdp_0").exists()


def test_the_readme_commands_for_the_own_model_as_printed(tiny_data, tmp_path):
    """The README's --model.arch gpt commands in bash as printed (on the test data, shorter): each
    trains the option it names, as config.yaml records."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--model.arch gpt" in b)
    commands = [c for c in block.splitlines() if c.startswith("python scripts/train.py")]
    assert len(commands) == 2
    for name in ("scripts", "lib", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for command, saved in zip(commands, ("qk_norm: true", "mlp: relu2")):
        extra = (f" --data.dir {tiny_data} --runs_dir {tmp_path / 'runs'} --tracking.no_mlflow --max_steps 4 "
                 "--eval_every 0 --checkpoint_every 0 --eval_tokens 2000")
        proc = subprocess.run(["bash", "-c", command + extra], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        run = tmp_path / "runs" / command.split("--run_name ")[1].split()[0]
        assert saved in (run / "config.yaml").read_text() and "arch: gpt" in (run / "config.yaml").read_text()


def test_the_readme_model_fork_commands_as_printed(tiny_data, tmp_path):
    """The README's `make fork ... FILE=lib/model/gpt.py` and the train.py command using the copy,
    in bash as printed (on the test data, shorter), in a repository of this tree's files."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--model.file" in b)
    fork, command = (c for c in block.splitlines() if c.strip())
    shutil.copytree(REPO / "lib", tmp_path / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "lib", "Makefile"], ["commit", "-q", "-m", "tree"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    made = subprocess.run(["bash", "-c", fork.split("#")[0]], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    copy = tmp_path / "experiments" / "my-model" / "gpt.py"
    assert copy.read_bytes() == (REPO / "lib" / "model" / "gpt.py").read_bytes()
    assert (tmp_path / "experiments" / "my-model" / "FORKED_FROM").read_text().split()[1] == "lib/model/gpt.py"
    extra = (f" --data.dir {tiny_data} --runs_dir {tmp_path / 'runs'} --tracking.no_mlflow --max_steps 4 "
             "--eval_every 0 --checkpoint_every 0 --eval_tokens 2000")
    proc = subprocess.run(["bash", "-c", command + extra], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "file: experiments/my-model/gpt.py" in (tmp_path / "runs" / "my-model" / "config.yaml").read_text()
    assert "exported as LlamaForCausalLM" in proc.stdout  # an unchanged copy is still a Llama


@pytest.mark.parametrize("option", [{"qk_norm": True}, {"mlp": "relu2"}, {"logit_softcap": 30.0}])
def test_an_own_model_option_on_a_transformers_architecture_is_refused_by_name(option):
    # the default preset sets qk_norm: `--model.arch llama` on it must not drop it silently
    from lib.errors import UserError
    from lib.model.build import ModelConfig, build_model

    with pytest.raises(UserError, match=r"--model\.(qk_norm|mlp relu2|logit_softcap) is an option of the project's own"):
        build_model(ModelConfig(arch="llama", d_model=32, n_layers=1, n_heads=2, **option), 64,
                    {"bos": 1, "eos": 2, "pad": 3})


def test_qk_norm_under_bf16_autocast_takes_torchs_fused_norm_without_a_warning():
    # the queries and keys come out of their projections in bf16 beside float32 norm weights
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, qk_norm=True))
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert model.model.layers[0].self_attn.q_norm.weight.grad.dtype == torch.float32
