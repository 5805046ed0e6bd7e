"""The check the multi-process backend tests share: a run of several ranks against one process."""
import pytest
import torch


def assert_runs_agree(got: dict, want: dict, what: str = "") -> None:
    """`got` and `want` (`{"metrics": [per-step tuples], "params": {path: tensor}}`) agree to fp32
    rounding: the ranks add the same terms in another order (per-rank partial sums, then the
    all-reduce / reduce-scatter / all-gather), so agreement is to rounding, not bitwise; 1e-5 is
    ~100 ulps at these magnitudes. A missed reduction or a wrong shard is off by far more."""
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert g == pytest.approx(w, abs=1e-5), what
    assert got["params"].keys() == want["params"].keys(), what
    for path, value in want["params"].items():
        torch.testing.assert_close(got["params"][path], value, atol=1e-5, rtol=1e-5, msg=f"{what} {path}")
