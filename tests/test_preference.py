"""Preference objectives (lib/model/preference.py) against the reference implementation: on the
same batch, policy and reference, this project's DPO and IPO loss, rewards, reward accuracy and
margin, and log-probabilities equal trl's DPOTrainer's (fp32, within 1e-5), and so does DPO with
the SFT term on the chosen responses (trl's loss_type ["sigmoid", "sft"])."""
from __future__ import annotations

import pytest
import torch

from lib.model.preference import PREFERENCE_LOSSES, PreferenceOptions, batch_scores, pair_figures, pair_scores, summary


@pytest.fixture(autouse=True)
def accelerate_state_put_back():
    """trl's trainer sets up Accelerate's process-wide state; the in-process runs of later tests
    (conftest.run_in_process) must start without it, as a fresh process would."""
    threads = torch.get_num_threads()
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(a GPT-2-style base folder, its tokenizer, a policy: the base with its weights moved a little)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.base_models import save_gpt2_base

    base = save_gpt2_base(tmp_path_factory.mktemp("pref") / "base")
    policy = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    with torch.no_grad():  # so the policy's log-ratios against the base are not all 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, AutoTokenizer.from_pretrained(base), policy


def pairs():
    from datasets import Dataset

    # responses of different lengths, so padding and the per-token averages matter
    return Dataset.from_list([{"prompt": f"def f{i}(x):", "chosen": f" return x + {i}" + " * x" * (i % 3),
                               "rejected": f" pass  # {i}" + " nothing" * (2 - i % 3)} for i in range(8)])


@pytest.mark.parametrize("loss_type, name", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trls_on_the_same_batch(models, tmp_path, loss_type, name):
    import copy

    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    base, tok, policy = models
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=loss_type, per_device_train_batch_size=8,
                     report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=AutoModelForCausalLM.from_pretrained(base), args=args,
                         train_dataset=pairs(), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()  # GPT-2's dropout off in both, so that both score the same function
    trl_loss = trainer._compute_loss(trainer.model, batch, False)
    trl = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    reference = AutoModelForCausalLM.from_pretrained(base)
    ours_policy = copy.deepcopy(policy).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    scores = pair_scores(ours_policy(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    with torch.no_grad():
        ref_scores = pair_scores(reference(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    figures = PREFERENCE_LOSSES.get(name, "--preference.name")(scores, ref_scores, PreferenceOptions(name=name, beta=beta))
    ours = summary(figures, scores)
    assert figures.loss.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for mine, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("logp_chosen", "logps/chosen"), ("logp_rejected", "logps/rejected")):
        assert ours[mine] == pytest.approx(trl[theirs], abs=1e-5), mine
    assert 0 < ours["reward_accuracy"] < 1 and ours["reward_margin"] != 0  # a batch where the figures say something
    # the gradient flows through the policy alone
    figures.loss.mean().backward()
    assert next(ours_policy.parameters()).grad is not None


def test_dpo_with_the_sft_term_equals_trls_sigmoid_plus_sft_pair_by_pair(models, tmp_path):
    """trl's SFT term is the token mean of the chosen responses' negative log-likelihood over its
    batch, this project's is each pair's own token mean (so that each pair weighs the same however
    a step is split): the two agree on a batch of one pair, compared here on each of eight."""
    import copy

    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    base, tok, policy = models
    beta, weight = 0.3, 0.7
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, weight],
                     per_device_train_batch_size=1, report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=copy.deepcopy(policy).eval(), ref_model=AutoModelForCausalLM.from_pretrained(base),
                         args=args, train_dataset=pairs(), processing_class=tok)
    reference = AutoModelForCausalLM.from_pretrained(base)
    ours_policy = copy.deepcopy(policy).eval()
    opt = PreferenceOptions(beta=beta, sft_weight=weight)
    compared = []
    for batch in trainer.get_train_dataloader():
        trainer.model.eval()
        trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            scores = pair_scores(ours_policy(**inputs).logits, batch["input_ids"], batch["completion_mask"])
            ref_scores = pair_scores(reference(**inputs).logits, batch["input_ids"], batch["completion_mask"])
        loss = pair_figures(PREFERENCE_LOSSES.get("dpo", ""), scores, ref_scores, opt).loss
        without = pair_figures(PREFERENCE_LOSSES.get("dpo", ""), scores, ref_scores, PreferenceOptions(beta=beta)).loss
        assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
        compared.append((loss - without).item())
    assert len(compared) == 8 and min(compared) > 0.5  # the term is there, and weighs in (a tiny model's NLL is ~ln V)


def test_simpo_needs_no_reference_and_ranks_by_mean_log_probability():
    from lib.model.preference import Scores

    policy = Scores(torch.tensor([-4.0, -9.0]), torch.tensor([-8.0, -3.0]), torch.tensor([2.0, 3.0]),
                    torch.tensor([4.0, 1.0]))
    figures = PREFERENCE_LOSSES.get("simpo", "--preference.name")(policy, None, PreferenceOptions(name="simpo", beta=2.0, gamma=0.5))
    # pair 0: means -2 and -2 -> tied rewards, not ranked right; pair 1: -3 against -3 as well
    assert figures.chosen_reward.tolist() == [-4.0, -6.0] and figures.rejected_reward.tolist() == [-4.0, -6.0]
    assert figures.ranked_right.tolist() == [0.0, 0.0]
    assert figures.loss.tolist() == pytest.approx([-torch.nn.functional.logsigmoid(torch.tensor(-0.5)).item()] * 2)
    assert not PREFERENCE_LOSSES.meta("simpo", "uses_reference", True) and PREFERENCE_LOSSES.meta("dpo", "uses_reference")


def test_preference_records_in_trls_layouts_give_one_prompt_and_two_answers():
    from lib.data.chat import parse_preference

    def pair(obj):
        p = parse_preference(obj, "pairs.jsonl:3")
        return p.prompt, p.chosen["content"], p.rejected["content"]

    user = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = (user, "4", "5")
    assert pair({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}) == expected
    assert pair({"chosen": user + [{"role": "assistant", "content": "4"}],
                 "rejected": user + [{"role": "assistant", "content": "5"}]}) == expected
    assert pair({"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
                 "rejected": [{"from": "gpt", "value": "5"}]}) == expected
    with_system = pair({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "system": "Be brief."})
    assert with_system[0] == [{"role": "system", "content": "Be brief."}] + user
    chosen, rejected = parse_preference({"prompt": "q", "chosen": "a", "rejected": "b"}, "x:1").conversations()
    assert [m["content"] for m in chosen.messages] == ["q", "a"] and rejected.messages[-1]["content"] == "b"


@pytest.mark.parametrize("record, says", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen response is empty"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}, "differ before"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "last turn of 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
])
def test_bad_preference_records_are_named_by_file_and_line(record, says):
    from lib.data.chat import parse_preference
    from lib.errors import UserError

    with pytest.raises(UserError, match=says) as caught:
        parse_preference(record, "pairs.jsonl:7")
    assert str(caught.value).startswith("pairs.jsonl:7: ")


def pairs_jsonl(path, n=120, bad_line=None):
    """Preference pairs in trl's two layouts, alternately; `bad_line`: that line's pair identical."""
    import json

    rows = []
    for i in range(n):
        q, good, bad = f"What is {i} plus {i}?", f"{2 * i}.", f"{2 * i + 1}."
        if i + 1 == bad_line:
            bad = good
        rows.append({"prompt": q, "chosen": good, "rejected": bad, "system": "Answer with the number."} if i % 2 else
                    {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                     "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    from conftest import run_script

    tmp = tmp_path_factory.mktemp("pairs")
    run_script("scripts/tokenize.py", "--corpus.source", str(pairs_jsonl(tmp / "pairs.jsonl")), "--out_dir",
               str(tmp / "data"), "--tokenizer.vocab_size", "300")
    return tmp


def test_pairs_are_tokenized_side_by_side_with_their_prompts_masked(pair_data):
    import json

    import numpy as np
    from transformers import AutoTokenizer

    from lib.data.batches import load_masks, load_split

    tmp_path = pair_data
    manifest = json.loads((tmp_path / "data" / "tokens" / "manifest.json").read_text())
    assert manifest["pairs"] and manifest["loss_mask"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "data" / "tokenizer")
    for split in ("train", "val"):
        corpus = [json.loads(x) for x in (tmp_path / "data" / "corpus" / f"{split}-00000.jsonl").read_text().splitlines()]
        tokens, docs = load_split(tmp_path / "data" / "tokens", split)
        mask = np.concatenate(load_masks(tmp_path / "data" / "tokens", split))
        assert len(docs) == 2 * len(corpus)  # each pair whole in one split, chosen then rejected
        ends = np.cumsum(docs[:, 0])
        answers = [tok.decode(tokens[e - n:e][mask[e - n:e] == 1]) for e, n in zip(ends, docs[:, 0])]
        assert answers == [a for r in corpus for a in (r["chosen"][-1]["content"] + "</s>",
                                                       r["rejected"][-1]["content"] + "</s>")]
        prompts = [tok.decode(tokens[e - n:e][mask[e - n:e] == 0]) for e, n in zip(ends, docs[:, 0])]
        assert prompts[0::2] == prompts[1::2] and "plus" in prompts[0]


def test_a_bad_pair_is_named_by_file_and_line_or_skipped_and_counted(tmp_path):
    import json

    from conftest import run_script, train

    src = pairs_jsonl(tmp_path / "pairs.jsonl", bad_line=7)
    proc = run_script("scripts/tokenize.py", "--corpus.source", str(src), "--out_dir", str(tmp_path / "bad"),
                      "--tokenizer.vocab_size", "300", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pairs.jsonl:7: the chosen and rejected responses are identical" in proc.stderr, proc.stderr
    assert not (tmp_path / "bad" / "tokens").exists()
    run_script("scripts/tokenize.py", "--corpus.source", str(src), "--out_dir", str(tmp_path / "data"),
               "--tokenizer.vocab_size", "300", "--corpus.on_bad_record", "skip")
    corpus = json.loads((tmp_path / "data" / "corpus" / "manifest.json").read_text())
    assert corpus["skipped"] == {"bad_pair": 1} and corpus["pairs"] == 119
    # not trained on as documents, which would teach the rejected answers too
    refused = train(tmp_path / "data", tmp_path / "runs", "pairs", check=False)
    assert refused.returncode == 2 and "holds preference pairs" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs" / "pairs").exists()


def test_a_batch_of_pairs_scores_each_response_as_it_scores_alone(pair_data):
    import json

    from transformers import AutoTokenizer

    from lib.data.pairs import PairRows
    from lib.model.gpt import GPT, GPTConfig
    from lib.model.preference import response_logps

    data = pair_data / "data"
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    rows = PairRows(data / "tokens", "train", seq_len=128, pad_id=manifest["special_ids"]["pad"])
    corpus = [json.loads(x) for x in (data / "corpus" / "train-00000.jsonl").read_text().splitlines()]
    assert len(rows) == len(corpus) and rows.cut == 0
    batch = rows.make_batch([0, 5, 9])
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    answers = [tok.decode(ids[m == 1]) for ids, m in zip(batch.input_ids, batch.response_mask)]
    assert answers == [corpus[i][side][-1]["content"] + "</s>" for side in ("chosen", "rejected") for i in (0, 5, 9)]
    assert batch.n_pairs == 3 and (batch.input_ids[batch.attention_mask == 0] == manifest["special_ids"]["pad"]).all()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=manifest["vocab_size"], d_model=32, n_layers=2, n_heads=2, max_seq_len=128)).eval()
    with torch.no_grad():
        inputs = batch.model_inputs("cpu")
        together, counts = response_logps(model(**inputs).logits, inputs["input_ids"],
                                          torch.from_numpy(batch.response_mask))
        for r in range(6):  # each row alone, unpadded: right padding changes nothing before it
            n = int(batch.attention_mask[r].sum())
            ids = torch.from_numpy(batch.input_ids[r:r + 1, :n])
            alone, _ = response_logps(model(input_ids=ids).logits, ids, torch.from_numpy(batch.response_mask[r:r + 1, :n]))
            assert together[r].item() == pytest.approx(alone.item(), abs=1e-5)
    assert counts.tolist() == batch.response_mask[:, 1:].sum(1).tolist()
    # a seq_len that cuts every response away from some pairs: those pairs are left out, counted
    short = PairRows(data / "tokens", "train", seq_len=48, pad_id=0)
    assert short.cut > 0 and len(short) + short.cut == len(corpus)


def test_the_reference_of_a_lora_run_is_its_base_with_the_adapter_off(pair_data):
    import json

    from peft import LoraConfig, get_peft_model

    from lib.data.pairs import PairRows
    from lib.model.gpt import GPT, GPTConfig
    from lib.model.preference import reference_logps

    data = pair_data / "data"
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    rows = PairRows(data / "tokens", "val", seq_len=128, pad_id=manifest["special_ids"]["pad"])
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=manifest["vocab_size"], d_model=32, n_layers=2, n_heads=2, max_seq_len=128))
    expected = reference_logps(base, rows, 4, "cpu")
    assert expected.shape == (len(rows), 2) and (expected < 0).all()
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.train()
    assert not np_equal(reference_logps(lora.base_model.model, rows, 4, "cpu"), expected)  # the adapter counts...
    assert np_equal(reference_logps(lora, rows, 4, "cpu"), expected)  # ...unless switched off
    assert lora.training  # its mode put back


def np_equal(a, b) -> bool:
    import numpy as np

    return bool(np.allclose(a, b, atol=1e-6, rtol=0))


def test_eval_on_pairs_gives_the_reward_accuracy_against_the_reference(pair_data, tmp_path):
    import json

    from conftest import run_script
    from lib.data.pairs import PairRows
    from lib.model.gpt import GPT, GPTConfig
    from lib.model.preference import PREFERENCE_LOSSES, PreferenceOptions, batch_scores, reference_logps

    data = pair_data / "data"
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=manifest["vocab_size"], d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
    base, moved = GPT(cfg), GPT(cfg)
    moved.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    moved.save_pretrained(tmp_path / "moved")
    refused = run_script("scripts/eval.py", "--model", str(tmp_path / "moved"), "--data", str(data), check=False)
    assert refused.returncode == 2 and "--reference MODEL" in refused.stderr and "Traceback" not in refused.stderr
    proc = run_script("scripts/eval.py", "--model", str(tmp_path / "moved"), "--data", str(data), "--reference",
                      str(tmp_path / "base"), "--beta", "0.5", "--out_dir", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    rows = PairRows(data / "tokens", "val", 128, manifest["special_ids"]["pad"])
    ref = reference_logps(base.eval(), rows, 8, "cpu")
    with torch.no_grad():
        policy = batch_scores(moved.eval(), rows.make_batch(list(range(len(rows)))), "cpu")
    from lib.model.preference import Scores

    reference = Scores(torch.from_numpy(ref[:, 0]).float(), torch.from_numpy(ref[:, 1]).float(), None, None)
    figures = PREFERENCE_LOSSES.get("dpo", "--preference.name")(policy, reference, PreferenceOptions(beta=0.5))
    assert record["pairs"] == len(rows) and record["beta"] == 0.5
    assert record["reward_accuracy"] == pytest.approx(figures.ranked_right.mean().item())
    assert record["reward_margin"] == pytest.approx(figures.margin.mean().item(), abs=1e-4)
    assert f"reward accuracy  {record['reward_accuracy']:.4f}" in proc.stdout


@pytest.fixture(scope="module")
def dpo_base(pair_data):
    """A tiny model of the pairs' tokenizer, saved as a starting model (dropout on, so a resumed run
    must restore the random state), and the flags of a short DPO run from it."""
    import json
    import shutil

    from lib.model.gpt import GPT, GPTConfig

    data = pair_data / "data"
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=manifest["vocab_size"], d_model=32, n_layers=2, n_heads=2, max_seq_len=128,
                  dropout=0.1)).save_pretrained(pair_data / "base")
    for f in (data / "tokenizer").iterdir():
        shutil.copy(f, pair_data / "base" / f.name)
    return data, ["--model.init_from", str(pair_data / "base"), "--data.seq_len", "128", "--max_steps", "10",
                  "--log_every", "4", "--eval_every", "5", "--checkpoint_every", "0", "--micro_batch_size", "4",
                  "--optim.lr", "1e-3", "--precision", "fp32", "--deterministic", "--metrics_out", "ndjson,csv"]


def run_records(run) -> list[dict]:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def scored(run) -> list[dict]:
    """The train and eval records without their timings."""
    timing = ("tokens_per_s", "elapsed_s", "mfu", "peak_memory_gib")
    return [{k: v for k, v in r.items() if k not in timing and not k.startswith("sys_")}
            for r in run_records(run) if r["type"] in ("train", "eval")]


@pytest.mark.parametrize("how", ["full", "lora"])
def test_a_dpo_run_stopped_and_resumed_is_bitwise_the_straight_run(dpo_base, tmp_path, how):
    import shutil

    from safetensors.torch import load_file

    from conftest import train

    data, common = dpo_base
    common = common + (["--lora.r", "4"] if how == "lora" else [])
    straight = train(data, tmp_path, "straight", *common)
    assert "preference objective dpo, beta 0.1" in straight.stdout and "reference: 120 pairs scored" in straight.stdout
    records = run_records(tmp_path / "straight")
    first = next(r for r in records if r["type"] == "train")
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen",
            "logp_rejected"} <= first.keys()
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10] and evals[-1]["val_pairs"] == 8
    assert evals[-1]["val_reward_margin"] > 0 and evals[-1]["val_loss"] < 0.6931  # ranked apart, below log 2
    assert "reward accuracy" in (tmp_path / "straight" / "report.md").read_text()
    train(data, tmp_path, "resumed", *common, "--stop_at_step", "6")
    if how == "full":  # the reference cannot be recomputed from trained weights: its loss is an error
        kept = tmp_path / "reference.npz"
        shutil.move(tmp_path / "resumed" / "reference_logps.npz", kept)
        gone = train(data, tmp_path, "resumed", *common, "--resume", "auto", check=False)
        assert gone.returncode == 2 and "reference_logps.npz is missing" in gone.stderr
        assert "Traceback" not in gone.stderr
        shutil.move(kept, tmp_path / "resumed" / "reference_logps.npz")
    resumed = train(data, tmp_path, "resumed", *common, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "reference: " not in resumed.stdout  # read back, not rescored
    assert scored(tmp_path / "resumed") == scored(tmp_path / "straight")
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])  # the SFT term too: each pair's own token mean
def test_each_pair_counts_once_however_the_step_is_split(dpo_base, sft_weight):
    import json

    import numpy as np

    from lib.data.pairs import PairRows
    from lib.model.gpt import GPT, GPTConfig
    from lib.model.loss import step_scaled_loss
    from lib.model.preference import PairObjective

    data, _ = dpo_base
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    rows = PairRows(data / "tokens", "train", 128, manifest["special_ids"]["pad"])
    rows.reference = np.random.default_rng(0).normal(-40, 5, size=(len(rows), 2))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=manifest["vocab_size"], d_model=32, n_layers=2, n_heads=2, max_seq_len=128))
    opt = PreferenceOptions(sft_weight=sft_weight)
    objective = PairObjective(opt)
    pairs = [3, 17, 40, 41, 90, 100]  # responses of different lengths

    def grad(splits):  # the loop's arithmetic: each micro-batch's loss sum over the step's pairs
        model.zero_grad()
        for ids in splits:
            loss = objective.loss_sum(model, rows.make_batch(ids), "cpu")
            (step_scaled_loss(loss, len(pairs), 1, len(splits)) / len(splits)).backward()  # Accelerate's 1/accum
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole, halves, uneven = grad([pairs]), grad([pairs[:3], pairs[3:]]), grad([pairs[:1], pairs[1:]])
    model.zero_grad()  # the mean of the pairs' losses, computed directly
    policy = batch_scores(model, rows.make_batch(pairs), "cpu")
    ref = torch.from_numpy(rows.reference[pairs]).float()
    from lib.model.preference import Scores

    loss = PREFERENCE_LOSSES.get("dpo", "")(policy, Scores(ref[:, 0], ref[:, 1], None, None), opt).loss
    if sft_weight:
        loss = loss - sft_weight * policy.chosen / policy.chosen_tokens
    loss.mean().backward()
    direct = torch.cat([p.grad.flatten() for p in model.parameters()])
    scale = direct.abs().max()
    for g in (whole, halves, uneven):
        assert (g - direct).abs().max() <= 1e-5 * scale
    logged = objective.take_logged()  # what the three steps scored: 18 pairs
    assert 0 <= logged["reward_accuracy"] <= 1 and objective.sums is None


def test_simpo_on_two_ddp_processes_needs_no_reference_and_keeps_the_replicas_identical(dpo_base, tmp_path):
    from conftest import accelerate_launch, train

    data, common = dpo_base
    proc = train(data, tmp_path, "ddp", *common, "--max_steps", "4", "--micro_batch_size", "2", "--preference.name",
                 "simpo", "--preference.beta", "2.0", launcher=accelerate_launch("cpu_ddp"))
    assert "2 process(es)" in proc.stdout and "weights identical on all 2 processes: True" in proc.stdout
    assert "preference objective simpo, beta 2, gamma 0.5, no reference" in proc.stdout
    assert not (tmp_path / "ddp" / "reference_logps.npz").exists()
    rows = run_records(tmp_path / "ddp")
    train_rows = [r for r in rows if r["type"] == "train"]
    assert train_rows[-1]["step"] == 4 and 0 <= train_rows[-1]["reward_accuracy"] <= 1
    # SimPO's reward is beta times the mean log-probability per response token: negative, and finite
    final_eval = [r for r in rows if r["type"] == "eval"][-1]
    assert final_eval["val_reward_chosen"] < 0 and final_eval["val_loss"] > 0


def test_preference_options_on_text_data_and_pairs_without_a_starting_model_are_refused(dpo_base, tiny_data,
                                                                                       tmp_path):
    from conftest import train

    data, _ = dpo_base
    text = train(tiny_data, tmp_path, "text", "--preference.beta", "0.5", check=False)
    assert text.returncode == 2 and "--preference.beta" in text.stderr and "holds none" in text.stderr
    scratch = train(data, tmp_path, "scratch", "--data.seq_len", "128", check=False)
    assert scratch.returncode == 2 and "--model.init_from" in scratch.stderr and "Traceback" not in scratch.stderr
