"""What the suite runs on: the packed row, its transformers labels, and the kernel cases."""
import torch

from programs.bench.gpu.cases import hf_labels, kernel_cases, packed_batch, supervised_tokens
from pure import rng
from tests.tiny import TINY

TINY = TINY


def test_packed_batch_restarts_positions_per_document():
    batch = packed_batch(TINY, (3, 2, 4), rng.key(0), "cpu")
    assert batch["input_ids"].shape == (1, 9) and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]


def test_hf_labels_drop_each_document_start():
    batch = packed_batch(TINY, (3, 2, 4), rng.key(0), "cpu")
    labels = hf_labels(batch)
    assert (labels[0, [0, 3, 5]] == -100).all() and (labels[0, [1, 2, 4, 6, 7, 8]] != -100).all()
    assert supervised_tokens(batch) == 9 - 3  # every token but each document's last predicts one


def test_kernel_cases_cover_every_kernel_and_variant():
    names = [case[0] for case in kernel_cases("cpu", torch.float32)]
    assert any(n.startswith("rms_norm") for n in names) and any(n.startswith("swiglu") for n in names)
    assert any("bias" in n for n in names) and any("dropout" in n for n in names)
    assert any(n.startswith("linear_ce") and "trained" in n for n in names)
    assert any(n.startswith("linear_ce") and "trained" not in n for n in names)
