"""torch.compile of the pure train step: the whole step (gradient, dropout, NEFTune, optimizer)
is one graph, runs the same numbers as eager, and its compiled artifacts persist in a cache dir.

The Inductor test compiles a 1-layer model; its compiled graphs are kept in a cache folder under
the system temp dir, so later runs of the suite find them there (the persistence this module
exists for) and pay only Dynamo's tracing.
"""
import tempfile
from pathlib import Path

import pytest
import torch

from backends.compile import MIN_TORCH, cache_dir_for, compile_step
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.losses import sft
from pure.models.llama import init
from programs.optimizers import build_optimizer
from pure.schedules import build_schedule
from pure.train import init_train_state, make_apply, make_train_step
from pure.tree import tree_leaves
from tests.tiny import TINY

CONFIG = TINY.replace(num_hidden_layers=1)

compilable = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH,
                                reason=f"torch_compile needs torch >= {MIN_TORCH} (refused below, see the test of that)")


def make_step(dropout: float, neftune: float | None, schedule: str):
    params = init(CONFIG, rng.key(0))
    lora_config = LoraConfig(r=4, alpha=8, dropout=dropout)
    delta = init_lora(params, lora_config, rng.key(1), target_linear=True)
    optimizer = build_optimizer("adamw_torch", build_schedule(schedule, 1e-2, 10, warmup_steps=2),
                                weight_decay=0.01, max_grad_norm=1.0)
    step = make_train_step(sft, optimizer, make_apply(CONFIG, params, lora_config=lora_config, neftune_alpha=neftune))
    return step, init_train_state({"lora": delta, "params": {}}, optimizer, rng.key(2))


def batch(i: int, micro: int = 2):
    out = []
    for j in range(micro):
        ids = rng.randint(rng.key(100 + 10 * i + j), 0, CONFIG.vocab_size, (2, 16))
        labels = ids.clone()
        labels[:, : 3 + (i + j) % 5] = -100  # a different number of trained tokens every time
        out.append({"input_ids": ids, "labels": labels})
    return out


def leaves(state):
    return tree_leaves((state.trainable, state.opt_state))


@compilable
def test_whole_step_is_one_graph_with_dropout_and_neftune_and_matches_eager_bitwise():
    # backend="eager" runs Dynamo only: fullgraph=True fails on any graph break (a break inside
    # grad_and_value would send the whole gradient back to eager), and with no Inductor
    # rewriting the numbers must be bit-identical, RNG draws included.
    step, state = make_step(dropout=0.1, neftune=5.0, schedule="cosine")
    compiled = compile_step(step, None, backend="eager", fullgraph=True)
    eager_state = compiled_state = state
    for i in range(3):
        eager_state, eager_metrics = step(eager_state, batch(i))
        compiled_state, compiled_metrics = compiled(compiled_state, batch(i))
        assert compiled_state.step == eager_state.step == i + 1
        assert torch.equal(compiled_state.rng_key, eager_state.rng_key)
        assert torch.equal(compiled_metrics["train/loss"], eager_metrics["train/loss"])
        for a, b in zip(leaves(compiled_state), leaves(eager_state)):
            assert torch.equal(a, b)


def test_cache_dir_is_a_function_of_graph_keys_and_torch_version(tmp_path):
    a = cache_dir_for({"sequence_len": 512, "lora_r": 16}, "cpu", root=tmp_path)
    assert a == cache_dir_for({"lora_r": 16, "sequence_len": 512}, "cpu", root=tmp_path)
    assert a != cache_dir_for({"sequence_len": 1024, "lora_r": 16}, "cpu", root=tmp_path)
    assert a != cache_dir_for({"sequence_len": 512, "lora_r": 16}, "cuda", root=tmp_path)
    assert a.parent == tmp_path


def test_a_torch_too_old_to_trace_the_step_is_refused_with_the_config_key(monkeypatch):
    step, _ = make_step(dropout=0.0, neftune=None, schedule="constant")
    monkeypatch.setattr(torch, "__version__", "2.12.1+cu130")
    with pytest.raises(ValueError, match=r"torch_compile: true needs torch >= 2.13, this is 2.12.1\+cu130"):
        compile_step(step, None)


def test_unknown_backend_names_the_config_key():
    step, _ = make_step(dropout=0.0, neftune=None, schedule="constant")
    with pytest.raises(ValueError, match="torch_compile_backend"):
        compile_step(step, None, backend="no-such-backend")


@compilable
def test_inductor_step_matches_eager_and_keeps_its_compiled_graphs_on_disk():
    step, state = make_step(dropout=0.0, neftune=None, schedule="constant")
    cache = cache_dir_for({"test": "test_compile.inductor", "layers": 1}, "cpu",
                          root=Path(tempfile.gettempdir()) / "puretune-test-compile")
    compiled = compile_step(step, cache)
    eager_state = compiled_state = state
    for i in range(3):
        eager_state, eager_metrics = step(eager_state, batch(i, micro=1))
        compiled_state, compiled_metrics = compiled(compiled_state, batch(i, micro=1))
        # fp32, Inductor reorders and fuses reductions: parity to 1e-5 (measured ~2e-7)
        torch.testing.assert_close(compiled_metrics["train/loss"], eager_metrics["train/loss"], rtol=1e-5, atol=1e-5)
        for a, b in zip(leaves(compiled_state), leaves(eager_state)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(compiled_state.rng_key, eager_state.rng_key)
    # A constant schedule has no branch on the step: one graph for every step.
    assert len(compiled.compile_seconds) <= 1
    # the compiled graph is on disk in the run's cache folder, where the next process finds it
    assert any((cache / "inductor" / "fxgraph").rglob("*"))
