"""The reference log-prob cache: round trip, refusal of a cache of other data, atomic writes."""
import os

import pytest
import torch

from backends.reference_cache import load_reference_logps, save_reference_logps


def test_round_trip_is_exact_and_a_cache_of_other_data_is_ignored(tmp_path):
    path = tmp_path / "ref_logps-train.safetensors"
    assert load_reference_logps(path, 3) is None
    values = torch.tensor([[-1.5, -2.25], [-3.0, -0.5], [-7.125, -6.0]])
    save_reference_logps(path, values)
    assert torch.equal(load_reference_logps(path, 3), values)
    assert load_reference_logps(path, 4) is None  # another number of pairs: computed again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_crash_during_save_keeps_the_previous_cache(tmp_path, monkeypatch):
    path = tmp_path / "ref_logps-train.safetensors"
    before = torch.tensor([[-1.0, -2.0]])
    save_reference_logps(path, before)

    def crash(*args):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_reference_logps(path, torch.tensor([[-5.0, -6.0]]))
    monkeypatch.undo()
    assert torch.equal(load_reference_logps(path, 1), before)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
