"""The real axolotl example configs (/work/shared/compat/axolotl-examples) train as written.

For each example: a local dataset file of the same format as each of its dataset entries (the shape
its `type`, `field_*`, `message_property_mappings` and `roles` name), and a copy of the config with
only `base_model` (a tiny random SmolLM2-family model), each dataset `path`, `output_dir`,
`dataset_prepared_path` and `max_steps: 2` changed, plus the few `FOR_TIME` edits below.
`python -m programs.train --config copy.yaml` (its `main`, in-process) must then train two steps, or
refuse with the one line naming the feature puretune has not built. The table `EXPECTED` says which,
per file, so an example that trains and then regresses fails here, and so does one that is refused
and starts to train (update the table then).

`PURETUNE_SLOW_TESTS=1` runs every example exactly as written (no `FOR_TIME` edits): minutes on a
CPU, most of them the cold `torch.compile` (max-autotune) of the Qwen3 example.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from programs import train

EXAMPLES = Path("/work/shared/compat/axolotl-examples")
ROWS = 32

TRAINS = "trains"
# file -> TRAINS, or the start of the one refusal line (after "error: ") naming the missing feature
EXPECTED: dict[str, str] = {
    "llama-3--fft-8b.yaml": TRAINS,
    "llama-3--instruct-dpo-lora-8b.yml": TRAINS,
    "llama-3--instruct-lora-8b.yml": TRAINS,
    "llama-3--lora-1b-deduplicate-dpo.yml": TRAINS,
    "llama-3--lora-1b-kernels.yml": TRAINS,
    "llama-3--lora-1b-sample-packing-sequentially.yml": TRAINS,
    "llama-3--lora-1b.yml": TRAINS,
    "llama-3--lora-8b.yml": TRAINS,
    "llama-3--qlora-1b-kto.yaml": TRAINS,
    "llama-3--qlora-1b.yml": TRAINS,
    "mistral--dpo--mistral-dpo-qlora.yml": TRAINS,
    "mistral--orpo--mistral-qlora-orpo.yml": TRAINS,
    "qwen2--dpo.yaml": TRAINS,
    "qwen2--prm.yaml": TRAINS,
    "qwen2--reward-model.yaml": TRAINS,
    "qwen3--8b-lora-fused-attn-compile.yaml": TRAINS,
    "streaming--pretrain.yaml": TRAINS,
    "streaming--sft.yaml": TRAINS,
}

# Edits made only to keep this file to ~a minute on 2 CPU cores, each with its reason. Packed
# examples need real tokens for `gradient_accumulation_steps x micro_batch_size` full rows of
# sequence_len per step (puretune refuses data short of one batch, and packing computes no padding),
# so their sequence_len is cut to 512: fft-8b would otherwise push 2 x 8 x 8192 tokens through the
# 49k-row head (~80 s here). A cold CPU compile costs minutes, so the Qwen3 example runs eager.
PACKED_SHORT = {"sequence_len": 512}
FOR_TIME: dict[str, dict] = {
    "llama-3--fft-8b.yaml": PACKED_SHORT,
    "llama-3--lora-1b-kernels.yml": PACKED_SHORT,
    "llama-3--lora-1b-sample-packing-sequentially.yml": PACKED_SHORT,
    "llama-3--lora-1b.yml": PACKED_SHORT,
    "llama-3--lora-8b.yml": PACKED_SHORT,
    "llama-3--qlora-1b.yml": PACKED_SHORT,
    "qwen3--8b-lora-fused-attn-compile.yaml": {**PACKED_SHORT, "torch_compile": False},
    "streaming--pretrain.yaml": PACKED_SHORT,
    "streaming--sft.yaml": PACKED_SHORT,
}
AS_WRITTEN = os.environ.get("PURETUNE_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_64):
    """Linears of >= 64 inputs: bitsandbytes' CPU path needs whole 4-bit blocks per row."""
    return tiny_model_64


# ----------------------------------------------------------------------------- rows of each format


def _question(i: int) -> str:
    return f"What is {i} plus {i + 3}?"


WORDS = "the sum of two numbers is found by counting on from the first by the second".split()


def _answer(i: int, worse: bool = False, filler: int = 0) -> str:
    """The answer, then `filler` more words (about a token each) to make rows as long as packing needs."""
    words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(filler))
    return f"{i} plus {i + 3} is {2 * i + 3 + (7 if worse else 0)}." + (f" So {words}." if filler else "")


def _messages_shape(entry: dict):
    """(role key, content key, dataset role name of) for a chat_template entry's mappings and roles."""
    mappings = entry.get("message_property_mappings") or {}
    role_key = entry.get("message_field_role") or mappings.get("role", "role")
    content_key = entry.get("message_field_content") or mappings.get("content", "content")
    roles = entry.get("roles") or {}

    def role(name: str) -> str:
        return (roles.get(name) or [name])[0]

    return role_key, content_key, role


def data_size(config: dict) -> tuple[int, int]:
    """(rows, filler words per answer) for one dataset entry of the example: 32 short rows, or more
    (and, when packed, longer) rows when fewer would not make one accumulated batch after the
    validation split. puretune refuses data shorter than one batch (programs/loop.py), so the data
    grows to the example's batch shape instead of the batch shrinking to the data."""
    per_step = int(config.get("gradient_accumulation_steps") or 1) * int(config.get("micro_batch_size") or 1)
    kept = 1.0 - float(config.get("val_set_size") or 0.0)
    if config.get("sample_packing") and not config.get("rl"):
        # answers of ~sequence_len / 8 tokens: ~7 rows fill a bin, 25% spare for first-fit waste
        return max(ROWS, math.ceil(per_step * 8 * 1.25 / kept)), int(config.get("sequence_len") or 512) // 8
    return max(ROWS, math.ceil(per_step * 1.25 / kept)), 0


def rows_for(entry: dict, config: dict) -> list[dict]:
    """Rows in the shape of the example's dataset entry (axolotl's dataset-format docs)."""
    kind = config.get("rl") or ("rm" if config.get("reward_model") else "prm" if config.get("process_reward_model")
                                else "sft")
    kind_of_type = entry.get("type")
    role_key, content_key, role = _messages_shape(entry)
    n_rows, filler = data_size(config)

    def message(name: str, text: str) -> dict:
        return {role_key: role(name), content_key: text}

    rows = []
    for i in range(n_rows):
        answer, worse = _answer(i, filler=filler), _answer(i, worse=True, filler=filler)
        if kind_of_type == "alpaca":
            row = {"instruction": "Add the two numbers." if i % 2 else _question(i),
                   "input": f"{i} and {i + 3}" if i % 2 else "", "output": answer}
        elif kind_of_type == "chat_template" and kind == "sft":
            row = {entry.get("field_messages") or "messages": [message("user", _question(i)),
                                                               message("assistant", answer)]}
        elif kind_of_type == "chat_template.default" and kind in ("dpo", "ipo", "simpo", "orpo"):
            history = [message("system", "You add numbers."), message("user", _question(i))] if i % 2 else \
                [message("user", _question(i))]
            row = {entry.get("field_messages") or "messages": history,
                   entry.get("field_chosen") or "chosen": message("assistant", answer),
                   entry.get("field_rejected") or "rejected": message("assistant", worse)}
        elif kind_of_type == "chat_template.argilla":
            row = {"prompt": _question(i),
                   "chosen": [message("user", _question(i)), message("assistant", answer)],
                   "rejected": [message("user", _question(i)), message("assistant", worse)]}
        elif kind_of_type == "llama3.ultra" and kind == "kto":
            row = {"prompt": _question(i), "completion": worse if i % 3 == 0 else answer, "label": i % 3 != 0}
        elif kind_of_type == "bradley_terry.chat_template":
            row = {"system": "You add numbers.", "input": _question(i), "chosen": answer, "rejected": worse}
        elif kind_of_type == "stepwise_supervised":
            row = {"prompt": _question(i),
                   "completions": [f"Start from {i}.", f"Add {i + 3}.", f"The sum is {2 * i + 3 + i % 2}."],
                   "labels": [True, True, i % 2 == 0]}
        elif kind_of_type == "pretrain":
            row = {entry.get("text_column") or "text": f"{_question(i)} {answer}"}
        else:
            raise AssertionError(f"no row shape for dataset type {kind_of_type!r} ({kind}); add one here")
        rows.append(row)
    return rows


def local_copy(example: Path, folder: Path, tiny_model: Path, for_time: dict | None = None) -> Path:
    """The example with base_model, dataset paths, output_dir, dataset_prepared_path and max_steps
    changed (and `for_time`), every other key as written; its datasets written next to it as JSON lines."""
    raw = yaml.safe_load(example.read_text())
    raw.update(for_time or {})
    raw["base_model"] = str(tiny_model)
    for key in ("datasets", "pretraining_dataset", "test_datasets"):
        for n, entry in enumerate(raw.get(key) or []):
            data = folder / f"{key}-{n}.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in rows_for(entry, raw)))
            entry["path"] = str(data)
    raw["output_dir"] = str(folder / "out")
    raw["dataset_prepared_path"] = str(folder / "prepared")
    raw["max_steps"] = 2
    path = folder / example.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the examples


def test_every_example_has_an_expected_outcome():
    assert sorted(p.name for p in EXAMPLES.glob("*.y*ml")) == sorted(EXPECTED)
    assert set(FOR_TIME) <= set(EXPECTED)
    for name, edits in FOR_TIME.items():  # each edit only shrinks the run
        raw = yaml.safe_load((EXAMPLES / name).read_text())
        assert edits.get("sequence_len", 0) <= raw["sequence_len"] and raw.get("sample_packing"), name
        assert set(edits) <= {"sequence_len", "torch_compile"}, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_axolotl_example_trains_or_names_the_missing_feature(name, tmp_path, tiny_model, capsys):
    config_path = local_copy(EXAMPLES / name, tmp_path, tiny_model, None if AS_WRITTEN else FOR_TIME.get(name))
    expected = EXPECTED[name]
    if expected != TRAINS:
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--config", str(config_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code != 0
        assert err[-1].startswith(f"error: {expected}"), err[-1]
        assert "is not supported yet by puretune" in err[-1]
        assert not (tmp_path / "out" / "metrics.jsonl").exists()
        return
    try:
        code = train.main(["--config", str(config_path)])
    except SystemExit as exc:  # a refusal: show its line (the last on stderr, after datasets' progress bars)
        pytest.fail(f"{name} did not train: {capsys.readouterr().err.strip().splitlines()[-1:]} (exit {exc.code})")
    assert code == 0
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps and steps[-1] == 2, records  # logging_steps may skip step 1; the last step is logged
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    exported = out / "adapter_model.safetensors" if yaml.safe_load(config_path.read_text()).get("adapter") \
        else out / "model" / "model.safetensors"
    assert exported.exists(), sorted(p.name for p in out.iterdir())
