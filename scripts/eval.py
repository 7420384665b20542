#!/usr/bin/env python
"""Evaluate a trained model on a held-out split: loss, perplexity, bits per byte, accuracy.

    python scripts/eval.py --model runs/default
    python scripts/eval.py --model runs/default/final --data data/stdlib --split val

Beside the model's bits per byte it prints what gzip, bz2 and lzma reach on the same text, so
you see at once whether the model learned more than a compressor. Results are appended to
OUT_DIR/metrics.jsonl (one JSON object per line) and rewritten as metrics.csv and metrics.parquet
(--metrics_out, as train.py writes its own); samples go to OUT_DIR/samples.txt. OUT_DIR defaults
to <run>/eval.

Talking to a model (a run, a model folder, a LoRA adapter folder or a model name, offline),
the text streamed as it is generated:

    python scripts/eval.py generate --model runs/default --prompt "def parse("
    python scripts/eval.py generate --model runs/default --interactive      # a prompt per line
    python scripts/eval.py generate --model runs/sft --chat                 # a conversation

Evaluating a run as it was trained (its data, seq_len, document masking and precision, the
default stride, the whole split, into <run>/eval) also updates the run's report.md and its MLflow
run. An evaluation with other options, or written elsewhere, is its own record only.
"""
import os
import sys

# Python puts this file's folder first on sys.path, where scripts/tokenize.py would shadow the
# standard library's `tokenize` for everything imported after it: use the repo root instead.
_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib import errors  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.model.generate import GenerationOptions  # noqa: E402
from lib.train.precision import recorded as recorded_precision  # noqa: E402


@dataclass
class EvalConfig:
    """Evaluate a model folder (or a run folder holding final/) on a tokenized split."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    model: Path = Path("runs/default")
    """A run folder (its final/ is used), a Hugging Face model folder, or a model name found in the
    Hugging Face cache (gpt2, tinyllama, org/name: see lib/model/registry.py)."""
    data: Optional[str] = None
    """Tokenized dataset folder; default: the one the run trained on, else data/stdlib."""
    split: str = "val"
    seq_len: Optional[int] = None
    """Context per evaluated block; default: the run's training seq_len, else the model's maximum."""
    stride: Optional[int] = None
    """Start a window every this many tokens, scoring only tokens not scored before, so each sees
    at least seq_len - stride tokens of context; default: seq_len // 2. seq_len = disjoint blocks."""
    doc_mask: Optional[bool] = None
    """Restart position ids at each document so that attention stays within it; default: as
    the run was trained (data.doc_mask), off for a model folder outside a run."""
    batch_size: int = 16
    max_tokens: Optional[int] = None
    """Evaluate a sample: whole documents drawn with a fixed seed (--sample_seed) from across the
    split until they hold this many tokens (train.py's evaluations use seed 0); None: the whole split."""
    sample_seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: a run's own precision (its provenance.json) on the kind of device it was trained on;
    otherwise as train.py decides it: bf16 on a GPU that has it; on a CPU, bf16 only where the
    model's matrix products measure clearly faster in bf16 than in fp32 here (measured once, cached)."""
    out_dir: Optional[Path] = None
    """Where metrics and samples go; default: <run>/eval (or <model>/eval)."""
    metrics_out: str = "ndjson,csv,parquet"
    """Formats of the metrics, comma-separated: ndjson, csv, parquet (metrics.jsonl is always written)."""
    samples: int = 2
    """Text samples to generate (0: none)."""
    sample_tokens: int = 120
    prompt: Optional[str] = None
    """What the samples continue; default: the opening words of held-out documents, one each."""
    temperature: float = 0.8
    seed: int = 0
    trust_unverified: bool = False
    """Score a run's final model even though its checksums.json (written by train.py) is missing, so
    that its files cannot be checked; without it such a model is refused."""
    tracking: bool = True
    """Add the figures (and metrics.csv, samples.txt, the report) to the MLflow run that the training
    run recorded in its tracking.json, when evaluating that run on its own data."""
    reference: Optional[Path] = None
    """On a folder of preference pairs: the model the rewards are measured against (a folder or a
    name); default: the run's starting model (its model.init_from)."""
    beta: float = 0.1
    """On preference pairs: the reward scale (DPO's beta): a reward is beta times the log-ratio."""
    tasks: tuple[str, ...] = ()
    """lm-evaluation-harness tasks to run on the model instead of scoring the held-out split (make
    lm-eval installs the harness); their figures go to the same metrics files, and to the run's
    MLflow run."""
    tasks_dir: Optional[Path] = None
    """A folder of task YAML files for --tasks (with local data files: offline). A YAML there that
    names `!function module.name` runs that module from the folder: refused unless allow_task_code."""
    allow_task_code: bool = False
    """Let the task YAML files of --tasks_dir run the Python code they name (`!function`) from their
    folder. Read that code first: it runs with your permissions."""


def run_tasks(cfg: EvalConfig, model_dir: Path, run_dir: Path | None, out_dir: Path) -> None:
    """--tasks: the harness on the model, one metrics record per task."""
    from lib.data.tokenizer import load_hf_tokenizer
    from lib.model import tasks
    from lib.model.build import load_pretrained
    from lib.records.metrics import METRICS, MetricsSink, parse_formats, read_jsonl

    manager = tasks.task_manager(cfg.tasks, cfg.tasks_dir, cfg.allow_task_code)
    results = tasks.run_tasks(load_pretrained(model_dir).eval(), load_hf_tokenizer(model_dir), cfg.tasks, manager,
                              cfg.batch_size)
    sink = MetricsSink(out_dir / METRICS, parse_formats(cfg.metrics_out))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    figures = {}
    for task, found in results.items():
        metrics = {k: v for k, v in found.items() if k != "documents"}
        sink.write({"time": stamp, "type": "task", "model": str(model_dir), "task": task,
                    "documents": found["documents"], **metrics})
        print(f"  {task:<24} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        figures.update({f"task_{task}_{k}": float(v) for k, v in metrics.items() if not k.endswith("_stderr")})
    sink.close()
    print(f"wrote {out_dir}/{METRICS}")
    if cfg.tracking and run_dir is not None:
        from lib.records.tracking import log_to_recorded_run

        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
        log_to_recorded_run(run_dir, figures, max(steps, default=0), [], print)


@dataclass
class GenerateConfig(GenerationOptions):
    """Continue a prompt, or talk: each line read from the terminal (or a pipe) is a prompt, or in
    --chat a user message answered in the conversation so far (the tokenizer's chat template);
    '/reset' starts the conversation over, an empty line or end of input ends."""

    model: str = "runs/default"
    """A run folder (its final/), a model folder, a LoRA adapter folder (final_adapter/, on the base
    its adapter_config.json names) or a model name in the Hugging Face cache."""
    prompt: Optional[str] = None
    """Text to continue (or, with --chat, the one user message) and exit."""
    interactive: bool = False
    """Read prompts (or chat messages) line by line from standard input until it ends."""
    chat: bool = False
    """Messages and answers through the tokenizer's chat template, as instruction tuning trained them."""
    system: Optional[str] = None
    """--chat: a system message in front of the conversation."""
    seed: int = 0
    trust_unverified: bool = False
    """Use a run's model even though its checksums.json is missing (its files cannot be checked);
    without it such a model is refused, and a model whose files differ from the record always is."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: the run's trained precision on the kind of device it was trained on; else fp32 on a
    CPU, bf16 on a GPU that has it."""


def generate_command(cfg: GenerateConfig) -> None:
    import torch
    from accelerate.utils import set_seed

    from lib.model.generate import Session, locate

    if cfg.prompt is None and not cfg.interactive:
        raise UserError("give --prompt TEXT, or --interactive to read prompts from standard input")
    trained = cfg.precision == "auto" and recorded_precision(locate(cfg.model).run_dir)
    name = trained.name if trained else cfg.precision
    if name == "auto":
        name = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    from lib.progress import quiet_library_bars

    quiet_library_bars()
    session = Session.open(cfg.model, cfg, dtype=dtype, system=cfg.system, chat=cfg.chat,
                           trust_unverified=cfg.trust_unverified)
    set_seed(cfg.seed)
    say = (lambda text: session.chat_turn(text, sys.stdout)) if cfg.chat else (
        lambda text: session.complete(text, sys.stdout))
    if cfg.prompt is not None:
        if not cfg.chat:
            sys.stdout.write(cfg.prompt)
        say(cfg.prompt)
        sys.stdout.write("\n")
        return
    tty = sys.stdin.isatty()
    if tty:
        print(f"{cfg.model} ({name}): " + ("chat; /reset starts over" if cfg.chat else "a prompt per line")
              + "; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        text = line.rstrip("\n")
        if cfg.chat and text.strip() == "/reset":
            session.reset()
            continue
        sys.stdout.write(("assistant: " if cfg.chat else text) if not tty else "")
        say(text)
        sys.stdout.write("\n")
        sys.stdout.flush()


def weights_sha256(model_dir: Path, verified: dict[str, str] | None = None) -> str:
    """The exact weights scored: the sha256 of the model's weight file (of the file -> sha256 table
    when they are several), taken from `verified` (checksums just checked) where it has them."""
    from lib.files import canonical_hash, sha256_file

    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    sums = {p.name: (verified or {}).get(p.name) or sha256_file(p) for p in files}
    return next(iter(sums.values())) if len(sums) == 1 else canonical_hash(sums)


def departures(cfg: EvalConfig, run_dir: Path | None, out_dir: Path, precision: str) -> list[str]:
    """How this evaluation departs from the run's own (its data, seq_len, document masking and
    precision, the default stride, the whole split, into <run>/eval); only the run's own updates
    its report and MLflow run. ["not a run's final model"] outside a run."""
    if run_dir is None:
        return ["not a run's final model"]
    run_data = config_lib.load_yaml(run_dir / "config.yaml").get("data") or {}
    trained = recorded_precision(run_dir)
    found = [f"--data {cfg.data}"] if cfg.data is not None else []
    if out_dir.resolve() != (run_dir / "eval").resolve():
        found.append(f"--out_dir {cfg.out_dir}")
    if cfg.seq_len not in (None, run_data.get("seq_len")):
        found.append(f"--seq_len {cfg.seq_len}")
    if cfg.stride is not None:
        found.append(f"--stride {cfg.stride}")
    if cfg.doc_mask not in (None, bool(run_data.get("doc_mask", False))):
        found.append(f"--doc_mask {cfg.doc_mask}")
    if cfg.max_tokens is not None:
        found.append(f"--max_tokens {cfg.max_tokens}")
    if trained is not None and precision != trained.name:
        found.append(f"--precision {precision} (trained in {trained.name})")
    return found


def resolve_paths(cfg: EvalConfig) -> tuple[Path, Path | None, str]:
    """(model folder, run folder or None, data folder)."""
    model = cfg.model
    if (model / "final" / "config.json").is_file():
        run, model_dir = model, model / "final"
    elif (model / "config.json").is_file():
        run = model.parent if (model.parent / "config.yaml").is_file() else None
        model_dir = model
    elif not model.exists():  # a model name (gpt2, tinyllama, org/name): its folder in the Hugging Face cache
        from lib.model.registry import resolve

        run, model_dir = None, resolve(str(model), option="--model")
    else:
        raise UserError(f"--model {model}: neither a run folder with final/ nor a model folder with config.json")
    data = cfg.data
    if data is None and run is not None:
        # the run's data as its config gives it (relative to where the run was started), or the
        # absolute path its provenance recorded
        given = (config_lib.load_yaml(run / "config.yaml").get("data") or {}).get("dir")
        prov = run / "provenance.json"
        recorded = (json.loads(prov.read_text(encoding="utf-8")).get("data") or {}).get("dir") if prov.is_file() else None
        found = [d for d in (given, recorded) if d and Path(d).is_dir()]
        if not found:
            raise UserError(f"--model {model}: the run's data ({given}{f' or {recorded}' if recorded else ''}) is not "
                            "found from here; pass --data DATA_DIR (the folder tokenize.py wrote)")
        data = found[0]
    return model_dir, run, data or "data/stdlib"


@exit_on_user_error
def main() -> None:
    if sys.argv[1:2] == ["generate"]:
        return generate_command(config_lib.parse(GenerateConfig, sys.argv[2:], description=GenerateConfig.__doc__,
                                                 prog=f"{os.path.basename(sys.argv[0])} generate", presets=False))
    cfg = config_lib.parse(EvalConfig, description=__doc__, prog=f"{os.path.basename(sys.argv[0])} [generate]")
    model_dir, run_dir, data_dir = resolve_paths(cfg)
    if run_dir is not None:  # no training job may replace the weights (or the report) while they are scored
        from lib.records import run_folder

        try:
            run_folder.acquire(run_dir, advice="then evaluate the run")
            errors.at_exit(lambda exc: run_folder.release(run_dir))
        except OSError as exc:  # a read-only runs folder: no training job can write there either
            print(f"note: {run_dir} not locked for the evaluation ({exc.strerror or exc})")
    from lib.files import ensure_writable
    from lib.model.build import check_model_files

    # before any work: whether the weights are the ones the run wrote (a run's final/ without its
    # checksums.json is refused: a changed model would be scored as the run's), where results go
    verified = check_model_files(model_dir, run_dir is not None, cfg.trust_unverified)
    out_dir = ensure_writable(cfg.out_dir or ((run_dir or model_dir) / "eval"), "--out_dir")
    errors.writing_to(out_dir)
    if cfg.tasks:
        return run_tasks(cfg, model_dir, run_dir, out_dir)
    from lib.train.cpu import keep_freed_memory

    keep_freed_memory()  # reused activation buffers instead of page faults on every batch
    from lib.progress import quiet_library_bars

    quiet_library_bars()

    from accelerate import Accelerator
    from transformers import AutoConfig

    from lib.data import mixture
    from lib.files import atomic_text
    from lib.model.build import fp16_on_cpu, load_pretrained, refuse_masked_lm
    from lib.records.metrics import METRICS, MetricsSink, parse_formats, read_jsonl
    from lib.train.precision import resolve, shapes_of

    run_data = (config_lib.load_yaml(run_dir / "config.yaml").get("data") or {}) if run_dir else {}
    # a run trained on a mixture is scored on each source's split, and the mixture from them
    mix = mixture.parse_mix(run_data["mix"]) if run_data.get("mix") and cfg.data is None else []
    data_dirs = [s.dir for s in mix] or [Path(data_dir)]
    checked = [check_data(cfg, model_dir, d) for d in data_dirs]  # every split sound before any is scored
    if checked[0][1].get("pairs"):
        return score_pairs(cfg, model_dir, run_dir, out_dir, *checked[0], run_data)
    refuse_masked_lm(model_dir)
    import lib.model.gpt  # noqa: F401 -- registers the project's own model type

    model_cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    seq_len = cfg.seq_len or run_data.get("seq_len") or model_cfg.max_position_embeddings
    formats = parse_formats(cfg.metrics_out)
    choice = (cfg.precision == "auto" and recorded_precision(run_dir)) or \
        resolve(cfg.precision, shapes_of(model_cfg, cfg.batch_size * seq_len))
    precision = choice.name
    print(f"precision {precision}: {choice.reason}")
    accelerator = Accelerator(mixed_precision=choice.mixed_precision)
    fp16_on_cpu(accelerator)  # float16 autocast on CPU too (Accelerate alone would run fp32)
    model = load_pretrained(model_dir).to(accelerator.device)
    doc_mask = cfg.doc_mask if cfg.doc_mask is not None else bool(run_data.get("doc_mask", False))
    stride = cfg.stride or max(1, seq_len // 2)
    common = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(model_dir), "split": cfg.split,
              "seq_len": seq_len, "doc_mask": doc_mask, "stride": stride, "precision": precision,
              "weights_sha256": weights_sha256(model_dir, verified)}
    scored = [score_split(cfg, model, accelerator, tok_dir, manifest, seq_len, stride, doc_mask, precision, common)
              for tok_dir, manifest in checked]
    records = [sc["record"] for sc in scored]
    if mix:
        for source, record in zip(mix, records):
            record.update(source=source.name, weight=source.weight)
        whole = mixture.mixture_figures({s.name: sc["figures"] for s, sc in zip(mix, scored)},
                                        {s.name: s.weight for s in mix})
        records.append({**common, "data": "mixture", "source": "mixture", **whole})
        print(f"the mixture, by its weights ({', '.join(f'{s.name} {s.weight:.2f}' for s in mix)}):")
        print(f"  loss        {whole['loss']:.4f} nats/token")
        print(f"  bits/byte   {whole['bits_per_byte']:.4f}   model" if "bits_per_byte" in whole else "")

    samples = []
    if cfg.samples > 0:
        samples = write_free_samples(cfg, model, model_cfg, model_dir, accelerator, scored[0])

    sink = MetricsSink(out_dir / METRICS, formats)
    for record in records:
        sink.write(record)
    sink.close()
    if samples:
        with atomic_text(out_dir / "samples.txt") as f:
            for i, (prompt, text) in enumerate(samples):
                f.write(f"--- sample {i} (prompt {prompt!r}, temperature {cfg.temperature})\n{text}\n")
        print(f"sample 0 (prompt {samples[0][0]!r}):\n{samples[0][1]}")
    # the run's report and MLflow run show the run evaluated as it was trained, not with other options
    other = departures(cfg, run_dir, out_dir, precision)
    report = run_dir / "report.md" if not other else None
    if report is not None and report.is_file():
        from lib.records.report import set_report_section

        lines = [f"- {common['time']}: seq_len {seq_len}, stride {stride}, {precision}; weights scored: "
                 f"{model_dir.name}/ with sha256 {common['weights_sha256']}"]
        for sc, record in zip(scored, records):
            lines.append(f"- {record.get('source', Path(record['data']).parent.name)} ({record['data']}): {sc['whole']}, "
                         f"{sc['n_docs']} of {sc['of_docs']} documents, {record.get('bytes', 0):,} bytes, "
                         f"{record['tokens']:,} tokens, {sc['seconds']:.1f} s: " + figures_line(record, sc["baselines"]))
        if mix:
            lines.append("- the mixture, by its weights: " + figures_line(records[-1], {}))
        set_report_section(report, f"Held-out evaluation by eval.py ({cfg.split})", "\n".join(lines))
    tables = "".join(f", metrics.{f}" for f in formats if f != "ndjson")
    print(f"wrote {out_dir}/{METRICS}{tables}" + (", samples.txt" if samples else "")
          + (f"; {report}" if report is not None and report.is_file() else ""))
    if run_dir is not None and other:
        print(f"not the run's own evaluation ({', '.join(other)}): {run_dir}/report.md and its MLflow run are left as "
              "they were")
    if cfg.tracking and report is not None:  # the run's own data, as for the report
        from lib.records.tracking import log_to_recorded_run

        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
        keys = ("loss", "perplexity", "accuracy", "bits_per_byte")
        overall = records[-1]  # one dataset's, or the mixture's
        figures = {f"eval_{cfg.split}_{k}": float(overall[k]) for k in keys if k in overall}
        figures.update({f"eval_{cfg.split}_{k}_bits_per_byte": v for k, v in scored[0]["baselines"].items()} if not mix
                       else {})
        for record in records[:-1] if mix else []:
            figures.update({f"eval_{cfg.split}_{k}_{record['source']}": float(record[k]) for k in keys if k in record})
        log_to_recorded_run(run_dir, figures, max(steps, default=0), [
            ("eval", out_dir / "metrics.csv"), ("eval", out_dir / "samples.txt"), ("", report)], print,
            tags={f"eval_{cfg.split}_weights_sha256": common["weights_sha256"]})


def score_pairs(cfg: EvalConfig, model_dir: Path, run_dir: Path | None, out_dir: Path, tok_dir: Path, manifest: dict,
                run_data: dict) -> None:
    """A folder of preference pairs: how often the model's reward ranks the chosen response above
    the rejected one, against its reference (lib/model/preference.py), printed and recorded."""
    from lib.data.pairs import PairRows
    from lib.model.build import load_pretrained
    from lib.model.preference import PREFERENCE_LOSSES, PreferenceOptions, pair_logps, rows_summary
    from lib.records.metrics import METRICS, MetricsSink, parse_formats

    reference = cfg.reference
    if reference is None and run_dir is not None:
        started = (config_lib.load_yaml(run_dir / "config.yaml").get("model") or {}).get("init_from")
        reference = Path(started) if started else None
    if reference is None:
        raise UserError(f"--data {tok_dir.parent} holds preference pairs: name the model the rewards are measured "
                        "against with --reference MODEL (the model before preference tuning)")
    if not Path(reference).exists():
        from lib.model.registry import resolve

        reference = resolve(str(reference), option="--reference")
    model, ref = load_pretrained(model_dir), load_pretrained(reference)
    seq_len = cfg.seq_len or run_data.get("seq_len") or model.config.max_position_embeddings
    special = manifest["special_ids"]
    rows = PairRows(tok_dir, cfg.split, seq_len, special.get("pad") if special.get("pad") is not None else special["eos"])
    t0 = time.perf_counter()
    res = rows_summary(model, rows, pair_logps(ref, rows, cfg.batch_size, "cpu"), PREFERENCE_LOSSES.get("dpo", ""),
                       PreferenceOptions(beta=cfg.beta), cfg.batch_size, "cpu")
    res.pop("loss")
    print(f"model {model_dir} against {reference} on {tok_dir} [{cfg.split}]: {len(rows)} pairs"
          + (f" ({rows.cut} left out: their responses start past seq_len {seq_len})" if rows.cut else "")
          + f", beta {cfg.beta}, {time.perf_counter() - t0:.1f}s")
    if Path(model_dir).resolve() == Path(reference).resolve():
        print("  (the model is its own reference: every reward is 0, so no pair is ranked right by reward; the "
              "log-probability accuracy is its own ranking)")
    print(f"  reward accuracy  {res['reward_accuracy']:.4f} (chosen rewarded above rejected)")
    print(f"  reward margin    {res['reward_margin']:.4f}")
    print(f"  rewards          chosen {res['reward_chosen']:.4f}, rejected {res['reward_rejected']:.4f}")
    print(f"  log-probability  chosen {res['logp_chosen']:.2f}, rejected {res['logp_rejected']:.2f}")
    print(f"  log-probability accuracy {res['logp_accuracy']:.4f} (chosen likelier than rejected, no reference)")
    sink = MetricsSink(out_dir / METRICS, parse_formats(cfg.metrics_out))
    sink.write({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(model_dir), "reference": str(reference),
                "data": str(tok_dir), "split": cfg.split, "pairs": len(rows), "pairs_cut": rows.cut, "beta": cfg.beta,
                "seq_len": seq_len, **res})
    sink.close()
    print(f"wrote {out_dir}/{METRICS}")


def figures_line(record: dict, baselines: dict) -> str:
    """A report line's figures: bits per byte (against the compressors where they ran), loss, ..."""
    bpb = f"bits/byte **{record['bits_per_byte']:.4f}** " if "bits_per_byte" in record else ""
    against = (f"(lzma -9e {baselines['lzma']:.4f}, bz2 -9 {baselines['bz2']:.4f}, gzip -9 {baselines['gzip']:.4f})"
               if baselines else "")
    return (f"{bpb}{against}; loss {record['loss']:.4f}, perplexity {record['perplexity']:.2f}, "
            f"next-token accuracy {record['accuracy']:.3f}")


def check_data(cfg: EvalConfig, model_dir: Path, data_dir) -> tuple[Path, dict]:
    """(the tokens folder, its manifest) of a dataset folder, its split verified and in the model's tokenizer."""
    from lib.data.batches import tokens_dir, verify_shards
    from lib.data.corpus import read_manifest
    from lib.data.tokenizer import tokenizer_fingerprint

    tok_dir = tokens_dir(data_dir)
    manifest = read_manifest(tok_dir, "tokens")
    verify_shards(tok_dir, manifest, (cfg.split,))
    model_tok = tokenizer_fingerprint(model_dir)
    if model_tok is not None and model_tok != manifest["tokenizer_sha256"]:
        raise UserError(f"{model_dir} was trained with another tokenizer than {tok_dir}; evaluate on data encoded "
                        f"with the model's own tokenizer (scripts/tokenize.py --tokenizer {model_dir} ...)")
    return tok_dir, manifest


def score_split(cfg: EvalConfig, model, accelerator, tok_dir: Path, manifest: dict, seq_len: int, stride: int,
                doc_mask: bool, precision: str, common: dict) -> dict:
    """The model on one dataset's split (or its --max_tokens sample), printed beside what the
    compressors reach on the same text: its metrics record and what the report and samples use."""
    import numpy as np

    from lib.data.batches import DocBoundary, gather_docs, load_masks, load_split, sample_docs
    from lib.data.corpus import iter_records
    from lib.model.evaluate import compressor_bpb, evaluate_stream, summarize

    tokens, docs = load_split(tok_dir, cfg.split)
    chosen = sample_docs(docs, cfg.max_tokens, cfg.sample_seed)
    stream, n_bytes = gather_docs(tokens, docs, chosen)
    masks = load_masks(tok_dir, cfg.split)  # conversations: the assistant's tokens (and bytes) alone count
    mask_stream = gather_docs(np.concatenate(masks), docs, chosen)[0] if masks is not None else None
    n_docs = len(chosen)
    t0 = time.perf_counter()
    res = summarize(evaluate_stream(model, stream, seq_len, cfg.batch_size,
                                    accelerator.device, accelerator.autocast, stride, progress=True,
                                    boundary=DocBoundary.of(manifest["special_ids"]) if doc_mask else None,
                                    mask=mask_stream),
                    n_bytes)
    secs = time.perf_counter() - t0
    keep = set(chosen.tolist())
    doc_texts = [r["text"] for i, r in enumerate(iter_records(tok_dir / manifest["corpus_dir"], cfg.split))
                 if i in keep]
    text = "".join(doc_texts)
    if masks is None and len(text.encode("utf-8")) != n_bytes:
        raise UserError(f"{tok_dir}: token shards and corpus text disagree; rebuild with scripts/tokenize.py --force")
    # a compressor sees the whole text; the model is scored on the answers given their prompts
    baselines = compressor_bpb(text.encode("utf-8")) if masks is None else {}

    whole = "the whole split" if n_docs == len(docs) else f"a sample (seed {cfg.sample_seed})"
    print(f"model {common['model']} on {tok_dir} [{cfg.split}], {whole}: {n_docs} of {len(docs)} documents, "
          f"{n_bytes:,} bytes, {res['tokens']:,} target tokens, seq_len {seq_len}, stride {stride}, doc_mask {doc_mask}, "
          f"{precision}, {secs:.1f}s")
    print(f"  loss        {res['loss']:.4f} nats/token")
    print(f"  perplexity  {res['perplexity']:.2f}")
    print(f"  accuracy    {res['accuracy']:.4f} (next token)")
    print(f"  bits/byte   {res['bits_per_byte']:.4f}   model")
    for name, bpb in baselines.items():
        verdict = "model better" if res["bits_per_byte"] < bpb else "compressor better"
        print(f"              {bpb:.4f}   {name:<5} ({verdict})")
    if masks is not None:
        print("              (the assistant's tokens and text only; compressors, which cannot be given the "
              "prompts, are not compared)")
    record = {**common, "data": str(tok_dir), "data_content_hash": manifest["content_hash"], "documents": n_docs,
              **res, **{f"{k}_bits_per_byte": v for k, v in baselines.items()}, "eval_seconds": secs}
    return {"record": record, "figures": res, "baselines": baselines, "whole": whole, "n_docs": n_docs,
            "of_docs": len(docs), "seconds": secs, "doc_texts": doc_texts, "manifest": manifest}


def write_free_samples(cfg: EvalConfig, model, model_cfg, model_dir: Path, accelerator, scored: dict) -> list:
    """(prompt, text) of --samples sampled continuations: of --prompt, else of the opening words
    (up to 48 characters, cut at a space) of held-out documents, one each."""
    import torch
    from accelerate.utils import set_seed

    from lib.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(model_dir)
    set_seed(cfg.seed)
    prompts = [cfg.prompt] * cfg.samples if cfg.prompt is not None else [
        (t[:48].rsplit(" ", 1)[0] if " " in t[:48] else t[:48]) for t in scored["doc_texts"][:cfg.samples]]
    bos = scored["manifest"]["special_ids"].get("bos")
    positions = getattr(model_cfg, "n_positions", None) or getattr(model_cfg, "max_position_embeddings", None)
    samples = []
    for prompt in prompts:
        # a document as the shards hold it: bos first (where there is one), whatever the client
        # tokenizer's own habit of adding it or not
        ids = ([bos] if bos is not None else []) + tok(prompt, add_special_tokens=False).input_ids
        new = cfg.sample_tokens if positions is None else max(0, min(cfg.sample_tokens, positions - len(ids)))
        with torch.no_grad(), accelerator.autocast():
            out = model.generate(torch.tensor([ids], device=accelerator.device), do_sample=True,
                                 temperature=cfg.temperature, max_new_tokens=new,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else bos)
        samples.append((prompt, tok.decode(out[0], skip_special_tokens=True)))
    return samples


if __name__ == "__main__":
    main()
