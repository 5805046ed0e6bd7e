"""Checkpoints of the train state: bit-exact round trip, atomic writes, pruning, clear errors."""
import dataclasses
import os

import pytest
import torch

from backends import checkpoint as ckpt
from pure import rng
from pure.lora import LoraConfig, init_lora
from pure.models import ModelConfig, init
from pure.optim import adamw
from pure.train import LossScaling, TrainState, init_train_state
from pure.tree import tree_leaves

CONFIG = ModelConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)


def fresh_state(seed=0):
    params = init(CONFIG, rng.key(seed))
    delta = init_lora(params, LoraConfig(r=2), rng.key(seed + 1), target_linear=True)
    return init_train_state({"lora": delta}, adamw(1e-3), rng.key(seed + 2))


def assert_states_equal(a, b):
    assert a.step == b.step and a.data_cursor == b.data_cursor
    la, lb = tree_leaves((a.trainable, a.opt_state, a.rng_key)), tree_leaves((b.trainable, b.opt_state, b.rng_key))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y


def test_round_trip_is_bit_exact(tmp_path):
    state = fresh_state().replace(step=7, data_cursor={"epoch": 1, "batch": 3})
    path = ckpt.save_checkpoint(state, tmp_path, extra={"note": "x"})
    restored, extra = ckpt.load_checkpoint(path, fresh_state(seed=5))
    assert_states_equal(state, restored)
    assert extra == {"note": "x"} and path.name == "checkpoint-7"


@dataclasses.dataclass(frozen=True)
class StateWithEma(TrainState):
    """A state with one more field, as a future TrainState might have: checkpoint.py is not told."""

    ema: dict | None = None
    ema_decay: float = 0.0


def assert_every_field_equal(a, b):
    for f in dataclasses.fields(a):
        la, lb = tree_leaves(getattr(a, f.name), none_is_leaf=True), tree_leaves(getattr(b, f.name), none_is_leaf=True)
        assert len(la) == len(lb), f.name
        for x, y in zip(la, lb):
            same = (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y
            assert same, f.name


def test_every_field_of_the_state_round_trips(tmp_path):
    state = fresh_state().replace(step=7, data_cursor={"epoch": 1, "batch": 3},
                                  loss_scale={**LossScaling(init_scale=8.0).init(), "good_steps": torch.tensor(5)})
    like = fresh_state(seed=5).replace(loss_scale=LossScaling().init())
    restored, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(state, tmp_path), like)
    assert_every_field_equal(state, restored)
    assert restored.loss_scale["scale"].item() == 8.0 and restored.loss_scale["good_steps"].item() == 5


def test_a_field_added_to_the_state_is_checkpointed_without_telling_checkpoint_py(tmp_path):
    base = fresh_state().replace(step=3)
    ema = {path: {k: v + 1 for k, v in entry.items()} for path, entry in base.trainable["lora"].items()}
    state = StateWithEma(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, ema=ema, ema_decay=0.9)
    like = StateWithEma(**{f.name: getattr(fresh_state(seed=5), f.name) for f in dataclasses.fields(base)},
                        ema={p: {k: torch.zeros_like(v) for k, v in e.items()} for p, e in ema.items()})
    restored, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(state, tmp_path), like)
    assert isinstance(restored, StateWithEma) and restored.ema_decay == 0.9
    assert_every_field_equal(state, restored)


def test_the_carry_is_restored_as_saved_whatever_the_fresh_state_holds(tmp_path):
    # GRPO's buffered generation batch: names and shapes unknown to a freshly initialised state.
    carry = {"mb0.input_ids": torch.arange(12).view(3, 4), "mb0.old_logps": torch.randn(3, 2, dtype=torch.float64),
             "position": 1, "generation": {"prompts": [3, 1]}}
    state = fresh_state().replace(step=2, carry=carry)
    restored, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(state, tmp_path), fresh_state(seed=5))
    assert sorted(restored.carry) == sorted(carry)
    for name, value in carry.items():
        got = restored.carry[name]
        assert (torch.equal(got, value) and got.dtype == value.dtype) if isinstance(value, torch.Tensor) else got == value
    empty, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(fresh_state().replace(step=3), tmp_path), state)
    assert empty.carry == {}  # an empty carry replaces whatever the template held


def test_the_state_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        fresh_state().step = 1


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state = fresh_state()
    ckpt.save_checkpoint(state.replace(step=1), tmp_path)

    def crash(*args):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(state.replace(step=2), tmp_path)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1"
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), state)
    # A temporary folder left by a SIGKILL is never taken for a checkpoint.
    (tmp_path / ".tmp-checkpoint-3-abc").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_total_limit_prunes_the_oldest(tmp_path):
    state = fresh_state()
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(state.replace(step=step), tmp_path, total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]


def test_damaged_or_mismatched_checkpoints_fail_clearly(tmp_path):
    path = ckpt.save_checkpoint(fresh_state(), tmp_path)
    other = init_train_state({"params": init(CONFIG, rng.key(0))}, adamw(1e-3), rng.key(0))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(path, other)
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(path, fresh_state())
