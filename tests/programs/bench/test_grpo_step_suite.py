"""`--suite grpo`: its options apart from the config overrides, and the split of the program's own
phase timings (the numbers are whatever the run measured; no timing is asserted)."""
import pytest

from programs.bench import BenchError
from programs.bench.grpo_step import split_args, split_of


def test_options_and_config_overrides_are_told_apart():
    own, overrides = split_args(["--suite", "grpo", "--config", "c.yaml", "--trl.beta", "0.04", "--steps=3",
                                 "--micro_batch_size", "8"])
    assert own == ["--suite", "grpo", "--config", "c.yaml", "--steps=3"]
    assert overrides == ["--trl.beta", "0.04", "--micro_batch_size", "8"]


def test_the_split_averages_generating_steps_after_the_warmup():
    def record(step, rollout, train, generating=True):
        r = {"step": step, "train/loss": 0.1, "time/train_s": train, "time/logps_s": 0.5, "time/reward_s": 0.1}
        if generating:
            r.update({"time/rollout_s": rollout, "rollout/tokens_per_second": 100.0, "completions/mean_length": 8.0})
        return r

    records = [record(1, 9.0, 9.0), record(2, 2.0, 3.0), record(3, 0.0, 4.0, generating=False), record(4, 4.0, 5.0)]
    split = split_of(records, warmup=1)
    assert split["steps"] == 2 and split["seconds"]["rollout"] == 3.0 and split["seconds"]["train"] == 4.0
    assert split["step_seconds"] == pytest.approx(3.0 + 0.1 + 0.5 + 4.0)
    assert sum(split["share"].values()) == pytest.approx(1.0)
    with pytest.raises(BenchError, match="raise --steps"):
        split_of(records, warmup=4)


def test_the_wall_time_of_a_step_comes_from_its_tokens_and_the_loops_rate():
    records = [{"step": s, "train/loss": 0.1, "time/train_s": 1.0, "time/rollout_s": 2.0, "completions/mean_length": 8.0,
                "rollout/tokens_per_second": 10.0, "num_tokens": 100.0 * s, "train/tokens_per_second": tps}
               for s, tps in ((1, 50.0), (2, 50.0), (3, 25.0))]
    split = split_of(records, warmup=1)
    assert split["wall_seconds"] == pytest.approx((100 / 50 + 100 / 25) / 2)  # less than the phases' 3 s sum: overlap
    assert split["step_seconds"] == pytest.approx(3.0)
