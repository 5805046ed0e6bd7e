"""`kernels.select_model_ops`: the fastest version of every hot op, or the reference where asked."""
import pytest
import torch

from kernels import MODEL_OPS, reference_model_ops, select_model_ops


def test_ops_named_in_reference_get_the_plain_torch_reference_and_the_rest_keep_the_kernels():
    chosen = select_model_ops("cpu", torch.float32)
    mixed = select_model_ops("cpu", torch.float32, reference=("rms_norm_fn", "attention_fn"))
    references = reference_model_ops()
    assert set(chosen) == set(mixed) == set(references) == set(MODEL_OPS)
    assert mixed["rms_norm_fn"] is references["rms_norm_fn"] is not chosen["rms_norm_fn"]
    assert mixed["attention_fn"] is references["attention_fn"] is not chosen["attention_fn"]
    assert mixed["swiglu_fn"] is chosen["swiglu_fn"] and mixed["lora_linear_fn"] is chosen["lora_linear_fn"]


def test_an_unknown_op_name_is_refused():
    with pytest.raises(ValueError, match="reference: unknown ops \\['rmsnorm'\\]"):
        select_model_ops("cpu", torch.float32, reference=("rmsnorm",))
