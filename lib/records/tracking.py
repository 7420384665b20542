"""Experiment tracking with MLflow, beside metrics.jsonl (which stays the run's own record).

Local unless the user opts in: by default runs go to a SQLite store in the runs folder
(`runs/mlflow.db`, artifacts in `runs/mlartifacts/`), an MLFLOW_TRACKING_URI found in the
environment is not used unless `--tracking.uri env` asks for it, and MLflow's usage telemetry is
switched off unless the user has set MLFLOW_DISABLE_TELEMETRY themselves.

Tracking never holds training up or stops it: MLflow is imported and called in a background
thread fed by a queue, and any failure (no SQLAlchemy, a locked database, a server that does not
answer) prints one warning and turns tracking off for the rest of the run. At the end the queue
is given --tracking.finish_timeout_s to drain. One process (the main one) tracks.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lib.errors import UserError, one_line

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
RECORD_NAME = "tracking.json"  # in the run folder: the MLflow run a resumed run continues


@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow)."""

    mlflow: bool = True
    """Mirror the run's parameters, metrics and small result files (config, report, plot) to MLflow."""
    uri: Optional[str] = None
    """Where: default a SQLite store in --runs_dir (view it with `mlflow ui --backend-store-uri
    sqlite:///runs/mlflow.db`); a server (http://...) or another store only when named here;
    'env' takes MLFLOW_TRACKING_URI from the environment."""
    experiment: str = "lm"
    """MLflow experiment the runs are filed under (created when missing)."""
    finish_timeout_s: float = 60.0
    """At the end, how long to wait for metrics still queued for MLflow before giving up on them."""


def effective_uri(cfg: TrackingConfig, runs_dir: str | Path) -> str | None:
    """The tracking URI a run uses (None: tracking off). Raises UserError for `env` without
    MLFLOW_TRACKING_URI set."""
    if not cfg.mlflow:
        return None
    if cfg.uri is None:
        return "sqlite:///" + str((Path(runs_dir) / DB_NAME).resolve())
    if cfg.uri == "env":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise UserError("--tracking.uri env: MLFLOW_TRACKING_URI is not set; set it, or name the store itself")
        return os.environ["MLFLOW_TRACKING_URI"]
    return cfg.uri


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: a nested config as MLflow parameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def numeric_fields(record: dict) -> dict:
    """The fields of a metrics record MLflow can plot: finite numbers (booleans as 0/1), without
    the record's step and type."""
    out = {}
    for key, value in record.items():
        if key in ("step", "type") or value is None or isinstance(value, str):
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class Tracker:
    """Mirrors a run to MLflow from a background thread. `write(record)` takes metrics.jsonl
    records; `end(status, artifacts)` drains the queue (bounded), uploads the files and closes
    the MLflow run. Every failure is one warning, after which calls do nothing."""

    def __init__(self, uri: str, cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict,
                 tags: dict, continue_id: str | None, say: Callable[[str], None]):
        self.uri, self.cfg, self.run_dir, self.say = uri, cfg, Path(run_dir), say
        self.run_id: str | None = None
        self.failed: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._opened = threading.Event()  # set once the run is started in MLflow, or that failed
        self._thread = threading.Thread(target=self._work, args=(run_name, params, tags, continue_id),
                                        name="mlflow-tracking", daemon=True)
        self._thread.start()

    # ---- the training loop's side: never blocks on MLflow
    def write(self, record: dict) -> None:
        if self.failed is None and not self._ended and (fields := numeric_fields(record)):
            self._queue.put(("metrics", record.get("step", 0), fields))

    def end(self, status: str = "FINISHED", artifacts: tuple[Path, ...] = ()) -> None:
        """Close the MLflow run with `status` (FINISHED, KILLED, FAILED) after logging what is
        still queued and `artifacts` (those that exist); waits at most finish_timeout_s."""
        if self._ended:
            return
        self._ended = True
        self._queue.put(("end", status, tuple(p for p in artifacts if Path(p).is_file())))
        self._thread.join(self.cfg.finish_timeout_s)
        if self._thread.is_alive():
            self._fail(f"gave up after waiting {self.cfg.finish_timeout_s:g}s for MLflow at {self.uri}")
        elif self.failed is None:
            self.say(f"tracking: MLflow run {self.run_id} ({status.lower()}) in experiment '{self.cfg.experiment}' "
                     f"at {self.uri}")

    # ---- the background thread
    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            print(f"warning: MLflow tracking off for the rest of this run: {why} (metrics.jsonl holds "
                  "everything)", file=sys.stderr, flush=True)

    def _work(self, run_name, params, tags, continue_id) -> None:
        try:
            client = self._open(run_name, params, tags, continue_id)
        except Exception as exc:  # noqa: BLE001 -- tracking must never stop training
            self._fail(one_line(exc))
            return
        finally:
            self._opened.set()
        Metric = _mlflow()[1].Metric

        while True:
            item = self._queue.get()
            try:
                if item[0] == "metrics":
                    _, step, fields = item
                    stamp = _now_ms()
                    client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, int(step)) for k, v in fields.items()])
                else:
                    _, status, artifacts = item
                    for path in artifacts:
                        client.log_artifact(self.run_id, str(path))
                    client.set_terminated(self.run_id, status)
                    return
            except Exception as exc:  # noqa: BLE001
                self._fail(one_line(exc))
                return

    def _open(self, run_name, params, tags, continue_id):
        """Connect, find or create the experiment, and start (or continue) the run."""
        from lib.files import write_json

        MlflowClient, entities = _mlflow()
        Param, RunTag = entities.Param, entities.RunTag

        client = MlflowClient(tracking_uri=self.uri)
        local = self.uri.startswith("sqlite:///")
        with _file_lock(Path(self.uri[len("sqlite:///"):] + ".lock") if local else None):
            # runs started together in one runs folder would otherwise race to create the tables
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                where = (Path(self.uri[len("sqlite:///"):]).parent / ARTIFACTS_NAME).as_uri() if local else None
                experiment_id = client.create_experiment(self.cfg.experiment, artifact_location=where)
            else:
                experiment_id = experiment.experiment_id
        if continue_id is not None:
            client.update_run(continue_id, status="RUNNING")
            self.run_id = continue_id
        else:
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={k: str(v) for k, v in tags.items() if v is not None})
            self.run_id = run.info.run_id
            client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items() if v is not None])
            client.log_batch(self.run_id, tags=[RunTag("run_dir", str(self.run_dir.resolve()))])
        write_json(self.run_dir / RECORD_NAME, {"uri": self.uri, "experiment": self.cfg.experiment,
                                                 "experiment_id": experiment_id, "run_id": self.run_id})
        return client


@contextlib.contextmanager
def _file_lock(path: Path | None):
    """An exclusive lock on `path` (created) while the block runs; nothing when path is None."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _mlflow():
    """(MlflowClient, mlflow.entities), imported with MLflow's usage telemetry off unless the user
    set MLFLOW_DISABLE_TELEMETRY (nothing leaves the machine unasked) and its INFO logs quiet."""
    import logging

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import entities
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # their INFO lines (creating tables, ...) are not the run's news;
        logging.getLogger(name).setLevel(logging.WARNING)  # set after the import, which sets mlflow's own
    return MlflowClient, entities


def preload(cfg: TrackingConfig) -> None:
    """Import MLflow (about a second of CPU) in a background thread now, while the run reads its
    data and builds its model, rather than beside the first training steps. Call after any timing
    measurement (the matmul probe), which it would disturb."""
    def load():
        try:
            _mlflow()
        except Exception:  # noqa: BLE001 -- Tracker reports it, once
            pass

    if cfg.mlflow:
        threading.Thread(target=load, name="mlflow-import", daemon=True).start()


def status_for(exc: BaseException | None) -> str:
    """The MLflow status of a run that main() ended with `exc`: FINISHED (a normal end), KILLED
    (stopped by a signal to be resumed: exit code 75, or Ctrl-C), FAILED (anything else)."""
    from lib.train.preemption import EXIT_STOPPED

    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == EXIT_STOPPED):
        return "KILLED"
    return "FAILED"


def start(cfg: TrackingConfig, run_dir: str | Path, params: dict, tags: dict, resumed: bool,
          say: Callable[[str], None], artifacts: tuple[str, ...] = (), wait_s: float = 15.0) -> Tracker | None:
    """A Tracker for this run, or None when tracking is off. A resumed run continues the MLflow
    run its folder records (tracking.json) when the URI and experiment are the same; otherwise,
    and for a fresh run, a new MLflow run is started. When the script's main() ends (however:
    lib.errors.at_exit) the MLflow run is closed with the matching status, after the files named
    in `artifacts` (relative to run_dir) that exist then are uploaded. Returns once MLflow is
    imported and the run started, or after wait_s: that CPU work stays out of the first timed
    training steps (the budget fit measures them), and a slow server costs at most wait_s. Call
    on the main process only. The MLflow run is named after the run folder, its parameters are `params` flattened
    (model.d_model, ...), its tags `tags` with the code's git commit and dirty state."""
    from lib.records.provenance import git_state

    uri = effective_uri(cfg, Path(run_dir).parent)
    if uri is None:
        return None
    continue_id = None
    record = Path(run_dir) / RECORD_NAME
    if resumed and record.is_file():
        import json

        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        if previous.get("uri") == uri and previous.get("experiment") == cfg.experiment:
            continue_id = previous.get("run_id")
    from lib.errors import at_exit

    git = git_state()
    tags = {**tags, "mlflow.source.git.commit": git["commit"], "git_dirty": git["dirty"]}
    say(f"tracking: MLflow, experiment '{cfg.experiment}' at {uri}" + (" (continuing its run)" if continue_id else "")
        + (f"; to browse: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else ""))
    tracker = Tracker(uri, cfg, Path(run_dir), Path(run_dir).name, flatten(params), tags, continue_id, say)
    at_exit(lambda exc: tracker.end(status_for(exc), tuple(Path(run_dir) / name for name in artifacts)))
    tracker._opened.wait(wait_s)
    return tracker


def log_to_recorded_run(run_dir: str | Path, metrics: dict, step: int, artifacts: list[tuple[str, Path]],
                        say: Callable[[str], None], timeout_s: float = 60.0, tags: dict | None = None) -> bool:
    """Add `metrics` (at `step`), `tags` and files ((artifact folder or '', local file) pairs) to the
    MLflow run a training run folder records in tracking.json, leaving that run's status as it is:
    eval.py's figures beside the training run's. False (and nothing done) when the folder records no run;
    a failure or a store that does not answer within timeout_s is one warning."""
    import json

    record_path = Path(run_dir) / RECORD_NAME
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text(encoding="utf-8"))
    failed: list[str] = []

    def work():
        try:
            MlflowClient, entities = _mlflow()
            Metric = entities.Metric
            client = MlflowClient(tracking_uri=record["uri"])
            stamp = _now_ms()
            client.log_batch(record["run_id"], metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()],
                             tags=[entities.RunTag(k, str(v)) for k, v in (tags or {}).items()])
            for folder, path in artifacts:
                if Path(path).is_file():
                    client.log_artifact(record["run_id"], str(path), folder or None)
        except Exception as exc:  # noqa: BLE001 -- the evaluation is written already; tracking is extra
            failed.append(one_line(exc))

    thread = threading.Thread(target=work, name="mlflow-eval", daemon=True)
    thread.start()
    thread.join(timeout_s)
    why = failed[0] if failed else (f"no answer from {record['uri']} within {timeout_s:g}s" if thread.is_alive() else None)
    if why:
        print(f"warning: not added to MLflow run {record['run_id']}: {why}", file=sys.stderr, flush=True)
        return False
    say(f"added to MLflow run {record['run_id']} at {record['uri']}")
    return True
