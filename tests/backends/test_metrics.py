"""Metric sinks: the JSONL file, and MLflow (a local file store, nothing leaves the machine)."""
import json

import pytest

from backends.metrics import MetricsLogger

CONFIG = {"learning_rate": 0.01, "lora_r": 4, "datasets": [{"path": "x.jsonl", "type": "chat_template"}],
          "wandb_project": None}


def test_jsonl_holds_one_record_per_log_call(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train/loss": 2.5}, echo=False)
    logger.log(2, {"train/loss": 2.0, "eval/loss": 2.2}, echo=False)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0, "eval/loss": 2.2}]


def mlflow_client(uri):
    mlflow = pytest.importorskip("mlflow")
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def history(client, run_id, name):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def test_mlflow_run_gets_params_and_metrics_in_a_file_store(tmp_path):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    logger = MetricsLogger(tmp_path / "out", config_dict=CONFIG, mlflow_tracking_uri=uri,
                           mlflow_experiment_name="tiny-sft", mlflow_run_name="run-1")
    logger.log(1, {"train/loss": 2.5, "train/grad_norm": 0.75, "note": "text is not a metric"}, echo=False)
    logger.log(2, {"train/loss": 2.0, "eval/loss": float("nan")}, echo=False)
    logger.close()

    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("tiny-sft")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.01"
    assert json.loads(run.data.params["datasets"]) == CONFIG["datasets"]
    assert "wandb_project" not in run.data.params  # unset keys are not params
    assert history(client, run.info.run_id, "train/loss") == [(1, 2.5), (2, 2.0)]
    assert history(client, run.info.run_id, "train/grad_norm") == [(1, 0.75)]
    assert history(client, run.info.run_id, "eval/loss") == []  # non-finite values are skipped


def test_resumed_logger_continues_the_same_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "store").as_uri()
    first = MetricsLogger(tmp_path / "out", config_dict=CONFIG, mlflow_tracking_uri=uri)
    first.log(1, {"train/loss": 3.0}, echo=False)
    first.close()
    again = MetricsLogger(tmp_path / "out", config_dict=CONFIG, mlflow_tracking_uri=uri, resume=True)
    again.log(2, {"train/loss": 2.0}, echo=False)
    again.close()
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("puretune").experiment_id])
    assert len(runs) == 1
    assert history(client, runs[0].info.run_id, "train/loss") == [(1, 3.0), (2, 2.0)]


def test_use_mlflow_alone_writes_a_store_inside_output_dir(tmp_path):
    pytest.importorskip("mlflow")
    logger = MetricsLogger(tmp_path, use_mlflow=True)
    logger.log(1, {"train/loss": 1.0}, echo=False)
    logger.close()
    saved = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    assert history(mlflow_client(saved["tracking_uri"]), saved["run_id"], "train/loss") == [(1, 1.0)]
