"""Metric sinks: console, a JSONL file in output_dir, TensorBoard, W&B and MLflow when asked for,
and a loss-curve PNG at the end. Metrics are flat dicts of scalars with stable names (`train/loss`)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def _scalar(value):
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else value


class RecordsOnly:
    """The logger of a process that does not log (a rank other than 0 under torchrun): it keeps the
    records in memory, as `MetricsLogger.records`, and writes nothing."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, step: int, metrics: dict, echo: bool = True) -> dict:
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        self.records.append(record)
        return record

    def truncate_after(self, step: int) -> None:
        self.records = [r for r in self.records if r["step"] <= step]

    def plot_losses(self) -> None:
        return None

    def close(self) -> None:
        return None


class MetricsLogger:
    def __init__(self, output_dir, *, use_tensorboard=False, wandb_project=None, wandb_name=None,
                 wandb_mode=None, wandb_entity=None, wandb_run_id=None, config_dict=None, resume=False,
                 use_mlflow=None, mlflow_tracking_uri=None, mlflow_experiment_name=None, mlflow_run_name=None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume and self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.file = open(self.path, "a" if resume else "w")
        self.tensorboard = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.output_dir / "runs"))
            except ImportError:
                print("warning: use_tensorboard is set but tensorboard is not installed; "
                      "pip install tensorboard", file=sys.stderr)
        self.wandb = None
        if wandb_project:
            try:
                import wandb

                mode = wandb_mode or ("offline" if not os.environ.get("WANDB_API_KEY") else "online")
                # a given run id continues that run (resume="allow"), as axolotl's wandb_run_id does
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, mode=mode, config=config_dict,
                                        dir=str(self.output_dir), entity=wandb_entity, id=wandb_run_id,
                                        resume="allow" if wandb_run_id else None)
            except ImportError:
                print("warning: wandb_project is set but wandb is not installed; pip install wandb", file=sys.stderr)
        self.mlflow = None
        if use_mlflow or mlflow_tracking_uri or mlflow_experiment_name:
            try:
                self.mlflow = MlflowSink(self.output_dir, tracking_uri=mlflow_tracking_uri,
                                         experiment_name=mlflow_experiment_name, run_name=mlflow_run_name,
                                         config_dict=config_dict, resume=resume)
            except ImportError:
                print("warning: MLflow keys are set but mlflow is not installed; pip install mlflow-skinny",
                      file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume: forget records past the checkpoint's step (they will be logged again)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self.file.close()
        with open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        self.file = open(self.path, "a")

    def log(self, step: int, metrics: dict, echo: bool = True) -> dict:
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.mlflow is not None:
            self.mlflow.log(step, record)
        if echo:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if k != "step")
            print(f"step {step}: {shown}", flush=True)
        return record

    def plot_losses(self) -> Path | None:
        """Write loss.png: train and eval loss against the step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("note: loss.png not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in ("train/loss", "eval/loss"):
            points = [(r["step"], r[name]) for r in self.records if isinstance(r.get(name), float)
                      and math.isfinite(r[name])]
            if points:
                ax.plot(*zip(*points), marker="o" if name == "eval/loss" else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.output_dir / "loss.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.close()


class MlflowSink:
    """One MLflow run per output_dir, through `MlflowClient` (no global active run).

    tracking_uri: the `mlflow_tracking_uri` key; unset, a file store in `output_dir/mlruns`, so
    nothing leaves the machine unless a server URI is given. MLflow >= 3 refuses file stores
    unless `MLFLOW_ALLOW_FILE_STORE` is set; a `file:` URI here is the user's (or this default's)
    explicit choice, so it is set for this process. The run id is kept in `output_dir/mlflow_run.json`
    and a resumed run logs into the same MLflow run (steps after the checkpoint that were logged before
the stop get a second value at the same step: MLflow keeps every value). The config goes in as params (non-empty keys,
    values as text, MLflow's 6000-character limit), metrics at their step.
    """

    PARAM_LIMIT = 6000
    BATCH = 100  # MLflow's log_batch accepts at most 100 params per call

    def __init__(self, output_dir, *, tracking_uri=None, experiment_name=None, run_name=None, config_dict=None,
                 resume=False):
        from mlflow.tracking import MlflowClient

        output_dir = Path(output_dir)
        uri = tracking_uri or (output_dir / "mlruns").resolve().as_uri()
        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).resolve().as_uri()  # a bare folder path
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.id_file = output_dir / "mlflow_run.json"
        saved = json.loads(self.id_file.read_text()) if resume and self.id_file.is_file() else None
        if saved and saved.get("tracking_uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = experiment_name or "puretune"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.id_file.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id, "experiment": name}))
        self._log_params(config_dict or {})

    def _log_params(self, config_dict: dict) -> None:
        from mlflow.entities import Param

        params = [Param(str(k), (v if isinstance(v, str) else json.dumps(v, default=str))[: self.PARAM_LIMIT])
                  for k, v in sorted(config_dict.items()) if v is not None and v != [] and v != {}]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])

    def log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step)) for k, v in record.items()
                   if k != "step" and isinstance(v, float) and math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
