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


def step_metrics(metrics: dict) -> tuple[float, float, float]:
    """(loss, grad norm, trained tokens) of one step's metrics."""
    return tuple(float(metrics[name]) for name in ("train/loss", "train/grad_norm", "num_trained_tokens"))


def train_one_process(config, trainable: dict, frozen: dict, optimizer, lora_config, steps, key, **apply_kwargs) -> dict:
    """`{"metrics": [step_metrics per step], "params": {path: final tensor}}` of `pure.train`'s step
    over `steps` (each a list of micro-batches) in this process: the reference the ranks are held to."""
    from pure.losses import sft
    from pure.train import init_train_state, make_apply, make_train_step
    from pure.tree import leaves_with_paths

    step = make_train_step(sft, optimizer, make_apply(config, frozen, lora_config=lora_config, **apply_kwargs))
    state, history = init_train_state(trainable, optimizer, key), []
    for micro_batches in steps:
        state, metrics = step(state, micro_batches)
        history.append(step_metrics(metrics))
    return {"metrics": history, "params": dict(leaves_with_paths(state.trainable))}
