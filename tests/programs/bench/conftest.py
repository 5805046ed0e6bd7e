"""The benchmark's config: the bench example config on the tiny random model and 40 alpaca rows."""
from pathlib import Path

import pytest
import yaml

from programs.config import load_config

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "configs" / "data"


@pytest.fixture(scope="module")
def bench_config_path(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    rows = (DATA / "conversions_alpaca.jsonl").read_text().splitlines()[:40]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = yaml.safe_load((REPO / "configs" / "bench-sft-lora-smollm2.yaml").read_text())
    raw.update({"base_model": str(tiny_model), "datasets": [{"path": str(tmp / "train.jsonl"), "type": "alpaca"}],
                "dataset_prepared_path": str(tmp / "prepared"), "output_dir": str(tmp / "out"),
                "micro_batch_size": 2, "lora_r": 4, "lora_alpha": 8})
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def bench_config(bench_config_path):
    return load_config(bench_config_path)
