"""MLflow tracking: a mirror of metrics.jsonl, local unless the user names another store, continued
by a resumed run, closed with the status the run ended with, and never a reason for training to
stop."""
from __future__ import annotations

import json

import pytest

from conftest import BITWISE, free_port, run_script, train
from lib.records import tracking


def mlflow_runs(db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("lm")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_run_is_tracked_locally_and_its_resumed_part_continues_the_same_mlflow_run(tiny_data, tmp_path):
    common = ("--tracking.mlflow", "--max_steps", "8", "--log_every", "2", "--eval_every", "4",
              "--checkpoint_every", "4", *BITWISE)
    # a tracking server named in the environment is not used unless --tracking.uri env asks for it
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    first = train(tiny_data, tmp_path, "tracked", *common, "--stop_at_step", "4", env=env, cwd=cwd)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db.resolve()}"
    assert f"tracking: MLflow, experiment 'lm' at {uri}; to browse: mlflow ui --backend-store-uri {uri}" in first.stdout
    assert "warning" not in first.stderr
    record = json.loads((tmp_path / "tracked" / "tracking.json").read_text())
    assert record["uri"] == uri
    assert json.loads((tmp_path / "tracked" / "provenance.json").read_text())["tracking_uri"] == uri
    client, runs = mlflow_runs(db)
    assert [r.info.run_id for r in runs] == [record["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model.d_model"] == "64" and run.data.params["optim.lr"] == "0.01"
    assert run.data.tags["precision"] == "fp32" and len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.metrics["sys_rss_gib"] > 0 and "sys_cpu_percent" in run.data.metrics  # lib.records.monitor's figures
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "train"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "config.yaml", "provenance.json", "metrics.jsonl", "loss.png", "report.md"}
    assert not list(cwd.iterdir())  # no mlruns/ or mlflow.db where the command ran

    again = train(tiny_data, tmp_path, "tracked", *common, "--resume", "auto", "--no_overwrite", env=env, cwd=cwd)
    assert "(continuing its run)" in again.stdout
    client, runs = mlflow_runs(db)
    assert [r.info.run_id for r in runs] == [record["run_id"]] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(record["run_id"], "loss")]
    assert steps[-2:] == [6, 8] and {2, 4} <= set(steps)
    assert [m.step for m in client.get_metric_history(record["run_id"], "val_loss")][-1] == 8
    # tracking (a thread, MLflow's imports) changes nothing in training: the stopped, resumed and
    # tracked run equals a straight untracked one bit for bit
    train(tiny_data, tmp_path, "straight", *common[1:], "--tracking.no_mlflow")
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"] for name in ("tracked", "straight")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert (tmp_path / "tracked" / "final" / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "final" / "model.safetensors").read_bytes()

    # eval.py on a sample of the run's data is its own record: the MLflow run is left alone
    proc = run_script("scripts/eval.py", "--model", str(tmp_path / "tracked"), "--max_tokens", "3000", "--samples", "0",
                      "--out_dir", str(tmp_path / "sampled"), env=env)
    assert "added to MLflow run" not in proc.stdout and "eval_val_loss" not in client.get_run(record["run_id"]).data.metrics
    # the run evaluated as trained (its own data, the whole split) adds its figures and files to it
    proc = run_script("scripts/eval.py", "--model", str(tmp_path / "tracked"), "--samples", "1",
                      "--sample_tokens", "8", env=env)
    assert f"added to MLflow run {record['run_id']} at {uri}" in proc.stdout
    figures = json.loads((tmp_path / "tracked" / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval_val_bits_per_byte"] == figures["bits_per_byte"]
    assert run.data.metrics["eval_val_lzma_bits_per_byte"] == figures["lzma_bits_per_byte"]
    assert [m.step for m in client.get_metric_history(record["run_id"], "eval_val_loss")] == [8]
    assert {a.path for a in client.list_artifacts(record["run_id"], "eval")} == {"eval/metrics.csv", "eval/samples.txt"}


def test_tracking_that_fails_warns_once_and_training_goes_on(tiny_data, tmp_path):
    # a store that cannot be opened (its folder is a file), and a server that does not answer
    # (given up on at the end)
    (tmp_path / "a_file").write_text("")
    for name, uri in (("bad_store", f"sqlite:///{tmp_path}/a_file/x.db"),
                      ("no_server", f"http://127.0.0.1:{free_port()}")):
        proc = train(tiny_data, tmp_path, name, "--tracking.mlflow", "--tracking.uri", uri,
                     "--tracking.finish_timeout_s", "3", "--max_steps", "4", "--eval_every", "0")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr
        assert proc.stderr.count("warning: MLflow tracking off for the rest of this run") == 1, proc.stderr
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
        assert [json.loads(x)["type"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1] == "final"
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_off_and_env_without_a_uri(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "untracked", "--max_steps", "2", "--eval_every", "0")  # the tests' default
    assert "tracking:" not in proc.stdout and not (tmp_path / "mlflow.db").exists()
    assert json.loads((tmp_path / "untracked" / "provenance.json").read_text())["tracking_uri"] is None
    proc = train(tiny_data, tmp_path, "env", "--tracking.mlflow", "--tracking.uri", "env", check=False)
    assert proc.returncode == 2 and "--tracking.uri env: MLFLOW_TRACKING_URI is not set" in proc.stderr
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("exc, status", [(None, "FINISHED"), (SystemExit(0), "FINISHED"), (SystemExit(75), "KILLED"),
                                         (KeyboardInterrupt(), "KILLED"), (SystemExit(2), "FAILED"),
                                         (RuntimeError("bug"), "FAILED")])
def test_the_mlflow_status_follows_how_main_ended(exc, status):
    assert tracking.status_for(exc) == status


def test_records_become_mlflow_metrics_and_the_config_parameters():
    record = {"type": "eval", "step": 4, "val_loss": 2.5, "replicas_identical": True, "mfu": None,
              "note": "text", "loss": float("nan"), "tokens_seen": 512}
    assert tracking.numeric_fields(record) == {"val_loss": 2.5, "replicas_identical": 1.0, "tokens_seen": 512.0}
    assert tracking.flatten({"a": 1, "b": {"c": 2, "d": {"e": None}}}) == {"a": 1, "b.c": 2, "b.d.e": None}


def test_at_exit_callbacks_see_how_main_ended(capsys):
    from lib.errors import UserError, at_exit, exit_on_user_error

    seen = []

    @exit_on_user_error
    def fails():
        at_exit(seen.append)
        at_exit(lambda exc: 1 / 0)  # a failing callback is reported, and the others still run
        raise UserError("--x: bad")

    with pytest.raises(SystemExit) as caught:
        fails()
    assert caught.value.code == 2 and isinstance(seen[0], SystemExit) and seen[0].code == 2
    assert "warning: while finishing: ZeroDivisionError" in capsys.readouterr().err

    @exit_on_user_error
    def works():
        at_exit(seen.append)

    works()
    works()  # callbacks of an earlier main() are not called again
    assert seen[1:] == [None, None]
