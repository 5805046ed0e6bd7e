"""Metric sinks: console, a JSONL file in output_dir, TensorBoard and W&B when asked for, and a
loss-curve PNG at the end. Metrics are flat dicts of scalars with stable names (`train/loss`)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def _scalar(value):
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else value


class MetricsLogger:
    def __init__(self, output_dir, *, use_tensorboard=False, wandb_project=None, wandb_name=None,
                 wandb_mode=None, config_dict=None, resume=False):
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
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, mode=mode, config=config_dict,
                                        dir=str(self.output_dir))
            except ImportError:
                print("warning: wandb_project is set but wandb is not installed; pip install wandb", file=sys.stderr)

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
