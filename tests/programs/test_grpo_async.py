"""Async GRPO and the off-policy keys through YAML configs, on the native engine: the background
producer samples ahead (stale by the depth, seen by the IS metrics), resume stays bitwise with
rollouts in flight, streaming scores the same, the replay buffer fills zero-signal groups, deferred
re-rolling brings their prompts back, and the corrections change the loss."""
import json

import pytest

from programs import grpo
from programs.config import ConfigError, load_config
from tests.programs.test_grpo import train_records, workdir, write_config  # noqa: F401 (workdir: a fixture)

ASYNC = {"use_data_producer": True, "async_prefetch": True}
# A reward with no signal for every prompt whose answer is odd: those groups have all-equal rewards.
HALF_SIGNAL = '''
def half_signal(completions, answer, **kwargs):
    return [0.0 if int(a) % 2 else float(len(c[0]["content"]) % 5) for c, a in zip(completions, answer)]
'''


def run(workdir, tiny_model, name, trl=None, stop_after_step=None, **keys):
    keys.setdefault("test_datasets", None)
    keys.setdefault("max_steps", 4)
    keys.setdefault("save_steps", 10)
    return grpo.run(load_config(write_config(workdir, tiny_model, name, trl=trl, **keys)),
                    stop_after_step=stop_after_step)


def sampling_gap(record):
    return record["sampling/sampling_logp_difference/max"]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_rollouts_are_depth_steps_stale_and_corrected(workdir, tiny_model, depth):
    records = train_records(run(workdir, tiny_model, f"d{depth}", trl={**ASYNC, "prefetch_depth": depth}))
    # IS correction is on by default with async (TRL's default mode and cap)
    assert {"sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean"} <= set(records[0])
    # generation 0 is sampled under the policy that trains on it; generation g under that of step
    # max(0, g - depth): stale from step 2 on. The native sampler's log-probs equal our forward's (fp32)
    assert sampling_gap(records[0]) < 1e-5
    assert all(sampling_gap(r) > 1e-3 for r in records[1:]), [sampling_gap(r) for r in records]
    if depth == 2:  # generations 1 and 2 were both queued at step 1, under the initial policy
        assert records[2]["sampling/sampling_logp_difference/mean"] > records[1]["sampling/sampling_logp_difference/mean"]


def test_synchronous_rollouts_need_no_correction(workdir, tiny_model):
    records = train_records(run(workdir, tiny_model, "sync", max_steps=2))
    assert not any(k.startswith("sampling/") for k in records[0])


def test_resume_with_rollouts_in_flight_is_bitwise(workdir, tiny_model):
    keys = dict(trl={**ASYNC, "prefetch_depth": 2, "beta": 0.1}, max_steps=5)
    straight = train_records(run(workdir, tiny_model, "straight", **keys))
    first = run(workdir, tiny_model, "split", stop_after_step=2, save_steps=2, **keys)
    assert first["stopped"]
    saved = json.loads((workdir / "split" / "checkpoint-2" / "state.json").read_text())
    assert any("/pending/" in name for name in saved["carry"]["tensors"])  # jobs in flight were saved
    resumed = run(workdir, tiny_model, "split", auto_resume_from_checkpoints=True, save_steps=2, **keys)
    assert train_records(resumed)[-3:] == straight[-3:]


def test_streaming_scores_as_the_whole_batch_does(workdir, tiny_model):
    plain = train_records(run(workdir, tiny_model, "plain", max_steps=2))
    streamed = train_records(run(workdir, tiny_model, "streamed", max_steps=2,
                                 trl={"use_data_producer": True, "streaming_partial_batch": True,
                                      "streaming_min_groups": 1}))
    assert streamed == plain


@pytest.fixture
def half_signal(workdir):
    (workdir / "test_half_signal.py").write_text(HALF_SIGNAL)
    return {"reward_funcs": ["test_half_signal.half_signal"], "reward_weights": None, "use_data_producer": True}


def test_the_replay_buffer_fills_groups_without_signal(workdir, tiny_model, half_signal):
    plain = train_records(run(workdir, tiny_model, "plain", max_steps=5, trl=half_signal))
    replay = train_records(run(workdir, tiny_model, "replay", max_steps=5,
                               trl={**half_signal, "replay_buffer_size": 2}))
    assert all(r["replay/buffer_size"] <= 2 for r in replay)
    assert sum(r["replay/replaced_groups"] for r in replay) > 0
    assert plain[0] == {k: v for k, v in replay[0].items() if not k.startswith("replay/")} or \
        replay[0]["replay/replaced_groups"] > 0  # nothing in the buffer yet at step 1 unless a group filled it
    differ = [i for i, (a, b) in enumerate(zip(plain, replay)) if a["train/loss"] != b["train/loss"]]
    assert differ and all(replay[i - 1]["replay/buffer_size"] > 0 for i in differ if i > 0)


def test_reroll_brings_back_prompts_without_signal(workdir, tiny_model, half_signal):
    trl = {**half_signal, "reroll_start_fraction": 0.5, "reroll_max_groups": 1, "log_completions": True,
           "num_completions_to_print": 0}
    records = train_records(run(workdir, tiny_model, "reroll", max_steps=6, trl=trl))
    assert records[0]["reroll/queue_size"] >= 0 and max(r["reroll/queue_size"] for r in records[:3]) > 0
    lines = [json.loads(x) for x in (workdir / "reroll" / "completions.jsonl").read_text().splitlines()]
    per_step = [lines[i:i + 8] for i in range(0, len(lines), 8)]  # 2 prompts x 4 completions a step
    prompts = [{json.dumps(r["prompt"]) for r in step} for step in per_step]
    # 16 prompts, 2 a step: no prompt repeats within the first epoch, except a re-rolled one, which
    # only happens from step 3 on (0.5 of 6 steps); a zero-signal prompt of an earlier step comes back
    seen_before = [p & set().union(*prompts[:i]) for i, p in enumerate(prompts)]
    assert not any(seen_before[:3]) and any(seen_before[3:]), seen_before


def test_the_corrections_change_the_loss(workdir, tiny_model):
    base = dict(trl={**ASYNC, "beta": 0.1}, max_steps=3)
    plain = train_records(run(workdir, tiny_model, "plain", **base))
    variants = {
        "token_truncate": {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_cap": 1.0001},
        "opsm": {"off_policy_mask_threshold": 0.0},
        "bias_kl": {"use_bias_correction_kl": True},
        "no_is": {"vllm_importance_sampling_correction": False},
    }
    for name, keys in variants.items():
        records = train_records(run(workdir, tiny_model, name, trl={**base["trl"], **keys}, max_steps=3))
        assert records[0]["reward"] == plain[0]["reward"]  # the same rollouts
        assert records[-1]["train/loss"] != plain[-1]["train/loss"], name
        if name == "token_truncate":
            assert all(r["sampling/importance_sampling_ratio/max"] <= 1.0001 + 1e-6 for r in records)
        if name == "opsm":
            assert records[-1]["off_policy_mask/dropped_ratio"] > 0
        if name == "no_is":
            assert not any(k.startswith("sampling/") for k in records[-1])


@pytest.mark.parametrize("trl,match", [
    ({"async_prefetch": True}, "async_prefetch .*use_data_producer"),
    ({"prefetch_depth": 2}, "prefetch_depth .*async_prefetch"),
    ({"streaming_min_groups": 2}, "streaming_min_groups .*streaming_partial_batch"),
    ({"vllm_importance_sampling_mode": "token_mask"}, "vllm_importance_sampling_mode"),
    ({"use_bias_correction_kl": True}, "use_bias_correction_kl .*beta"),
    ({"vllm_sync_interval": 2}, "vllm_sync_interval .*use_vllm"),
])
def test_keys_that_need_another_key_are_refused_by_name(workdir, tiny_model, trl, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_config(workdir, tiny_model, "x", trl=trl))
