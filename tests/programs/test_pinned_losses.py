"""Each training program's first losses on a fixed tiny model and fixed data, pinned to numbers
(torchtune's recipe-test pattern). The other program tests compare two runs of the current code;
these catch a wiring change that moves both runs alike. They drive only `main([...])` and read the
run's metrics.jsonl, so they keep working while the code under them is reorganised."""
import json
from pathlib import Path

import pytest
import yaml

from programs import dpo, kto, orpo, rm, sft

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"

# fp32 on CPU: only reduction order may differ between machines and torch builds.
RELATIVE_TOLERANCE = 1e-5

COMMON = {
    "sequence_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4,
    "learning_rate": 1e-2, "optimizer": "adamw_torch", "lr_scheduler": "cosine", "warmup_steps": 0,
    "logging_steps": 1, "save_steps": 100, "seed": 3,
}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True}
FULL = {"adapter": None}

# name: (program, data file, dataset type, config keys, the first four train/loss values). The DPO family
# starts at ln 2 and KTO at 0.5 (policy == reference); a loss normalised by the wrong count shows there first.
RUNS = {
    "sft_lora": (sft, "arithmetic_train", "chat_template", {**LORA, "sample_packing": True},
                 [10.751770, 10.780138, 10.754820, 10.689835]),
    "sft_full": (sft, "arithmetic_train", "chat_template", {**FULL, "learning_rate": 1e-3},
                 [10.768455, 10.707287, 10.684742, 10.681742]),
    "dpo_lora": (dpo, "preference_train", "chatml.prompt_pairs", {**LORA, "rl": "dpo"},
                 [0.6931472, 0.6907133, 0.6964602, 0.6945102]),
    "dpo_full": (dpo, "preference_train", "chatml.prompt_pairs", {**FULL, "rl": "dpo", "learning_rate": 1e-3},
                 [0.6931472, 0.6904789, 0.6953719, 0.6953128]),
    "rpo_lora": (dpo, "preference_train", "chatml.prompt_pairs", {**LORA, "rl": "dpo", "rpo_alpha": 0.5},
                 [6.0764322, 6.0560169, 6.0524006, 6.0441084]),
    "kto_lora": (kto, "kto_train", "chatml.prompt_pairs", {**LORA, "rl": "kto"},
                 [0.5, 0.5004459, 0.4988779, 0.4985926]),
    "orpo_lora": (orpo, "preference_train", "chat_template.argilla", {**LORA, "rl": "orpo", "orpo_alpha": 0.1},
                  [10.836649, 10.804573, 10.796583, 10.802346]),
    "rm_lora": (rm, "preference_train", "bradley_terry.chat_template",
                {**LORA, "reward_model": True, "num_labels": 1, "chat_template": "tokenizer_default"},
                [0.7158576, 0.6798091, 0.7066480, 0.7280997]),
}


def train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_losses_match_the_pinned_values(tmp_path, tiny_model, name):
    program, data, type_, keys, expected = RUNS[name]
    rows = (DATA / f"{data}.jsonl").read_text().splitlines()[:16]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    raw = {**COMMON, "base_model": str(tiny_model), "output_dir": str(tmp_path / "out"),
           "datasets": [{"path": str(tmp_path / "train.jsonl"), "type": type_}],
           "dataset_prepared_path": str(tmp_path / "prepared"), **keys}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert program.main(["--config", str(tmp_path / "run.yaml")]) == 0
    losses = train_losses(tmp_path / "out")
    assert losses == pytest.approx(expected, rel=RELATIVE_TOLERANCE)
