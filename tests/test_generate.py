"""eval.py generate: a prompt continued as transformers' own generate continues it, prompts and
chat messages read from a pipe, the chat template applied to the whole conversation, and a
model without one refused before its weights load."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from conftest import BITWISE, REPO, run_script, subprocess_env, train

TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("gen")
    train(tiny_data, runs, "small", *BITWISE, "--max_steps", "30", "--checkpoint_every", "0", "--eval_every", "0")
    return runs / "small"


def greedy(folder, prompt: str, n: int) -> str:
    """What transformers' Auto classes continue `prompt` with, greedily, as a client calls them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_prompt_and_piped_prompts_continue_as_transformers_does(run):
    args = ("--temperature", "0", "--max_new_tokens", "12")
    proc = run_script("scripts/eval.py", "generate", "--model", str(run), "--prompt", "def ", *args)
    expected = {p: greedy(run / "final", p, 12) for p in ("def ", "import ", "class ")}
    assert len(expected["def "]) > 3
    assert proc.stdout == "def " + expected["def "] + "\n"
    # a fresh process reading a pipe, as `printf ... | eval.py generate --interactive` does
    piped = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), "generate", "--model", str(run),
                            "--interactive", *args], input="import \nclass \n", capture_output=True, text=True,
                           env=subprocess_env(), timeout=300, cwd=REPO)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "".join(f"{p}{expected[p]}\n" for p in ("import ", "class "))
    # sampling: the seed decides the text
    sampled = [run_script("scripts/eval.py", "generate", "--model", str(run), "--prompt", "def ", "--seed", str(s),
                          "--max_new_tokens", "16").stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_chat_applies_the_template_to_the_whole_conversation(run, tmp_path):
    from lib.model.generate import GenerationOptions, Session
    from lib.files import write_checksums

    proc = run_script("scripts/eval.py", "generate", "--model", str(run), "--chat", "--prompt", "hi", check=False)
    assert proc.returncode != 0 and "has no chat template" in proc.stderr and "Traceback" not in proc.stderr

    chat = tmp_path / "chat"
    shutil.copytree(run / "final", chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    write_checksums(chat)  # edited on purpose: its record says so (generate checks it)
    session = Session.open(str(chat), GenerationOptions(temperature=0, max_new_tokens=8), system="be brief")
    first = session.chat_turn("what is os?", io.StringIO())
    seen = []
    session._generate = lambda ids, out: seen.append(session.tok.decode(ids)) or "fine"
    session.chat_turn("and sys?", io.StringIO())
    assert seen == [f"<s>system: be brief\nuser: what is os?\nassistant: {first.strip()}\nuser: and sys?\nassistant:"]
    session.reset()
    assert session.history == []

    piped = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), "generate", "--model", str(chat),
                            "--chat", "--interactive", "--temperature", "0", "--max_new_tokens", "8"],
                           input="what is os?\n/reset\nwhat is os?\n", capture_output=True, text=True,
                           env=subprocess_env(), timeout=300, cwd=REPO)
    assert piped.returncode == 0, piped.stderr
    answers = piped.stdout.split("assistant: ")[1:]
    assert len(answers) == 2 and answers[0] == answers[1] == first + "\n"  # /reset: the same first turn again


def test_bad_options_are_named(run):
    for args, what in ((["--temperature", "-1"], "--temperature -1"), (["--top_p", "0"], "--top_p 0.0"),
                       ([], "give --prompt TEXT, or --interactive")):
        proc = run_script("scripts/eval.py", "generate", "--model", str(run), *([] if not args else ["--prompt", "x"]),
                          *args, check=False)
        assert proc.returncode != 0 and what in proc.stderr, proc.stderr
