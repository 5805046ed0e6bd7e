"""GRPO and GDPO end to end on a tiny random model with the real SmolLM2 tokenizer: prompts through a
user transform, reward functions imported from the working directory, a few steps, eval, export,
bitwise resume from a checkpoint inside a generation, and the config's checks."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from programs import grpo
from programs.config import ConfigError, load_config
from pure.tree import tree_leaves

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
REWARDS = '''
def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]

def answer_reward(completions, answer, **kwargs):
    return [1.0 if a in c[0]["content"] else None if i % 3 == 0 else 0.0
            for i, (c, a) in enumerate(zip(completions, answer))]

def to_prompt(cfg, *args, **kwargs):
    def map_fn(example, tokenizer=None):
        question, reply = example["messages"][0]["content"], example["messages"][1]["content"]
        return {"prompt": [{"role": "user", "content": question}], "answer": reply.rsplit("=", 1)[1].strip()}
    return map_fn, {"remove_columns": ["messages"]}
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "test_rewards_mod.py").write_text(REWARDS)
    rows = (DATA / "arithmetic_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[16:20]) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(workdir, tiny_model, name, rl="grpo", trl=None, **overrides):
    raw = {
        "base_model": str(tiny_model), "rl": rl, "chat_template": "tokenizer_default",
        "datasets": [{"path": str(workdir / "train.jsonl"), "type": "test_rewards_mod.to_prompt"}],
        "test_datasets": [{"path": str(workdir / "eval.jsonl"), "type": "test_rewards_mod.to_prompt"}],
        "sequence_len": 128, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3, "eval_batch_size": 8,
        "learning_rate": 1e-2, "optimizer": "adamw_torch", "save_steps": 2, "eval_steps": 3, "logging_steps": 1,
        "output_dir": str(workdir / name), "seed": 5,
        "trl": {"num_generations": 4, "max_completion_length": 6, "temperature": 1.0,
                "reward_funcs": ["test_rewards_mod.length_reward", "test_rewards_mod.answer_reward"],
                "reward_weights": [1.0, 0.5], **(trl or {})},
    }
    raw.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_records(result):
    return [{k: v for k, v in r.items() if "per_second" not in k and "rss" not in k
             and not k.startswith("time/")}
            for r in result["records"] if "train/loss" in r]


TRL_METRICS = {"reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std",
               "rewards/answer_reward/mean", "frac_reward_zero_std", "completions/mean_length",
               "completions/min_length", "completions/max_length", "completions/clipped_ratio", "entropy",
               "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "num_tokens"}


@pytest.mark.parametrize("rl", ["grpo", "gdpo"])
def test_grpo_and_gdpo_train_evaluate_and_export(workdir, tiny_model, rl):
    result = grpo.run(load_config(write_config(workdir, tiny_model, rl, rl=rl, trl={"beta": 0.04})))
    assert result["step"] == 3 and not result["stopped"]
    first = result["records"][0]
    assert first["step"] == 0 and "eval/reward" in first and "eval/rewards/length_reward/mean" in first
    records = train_records(result)
    assert TRL_METRICS | {"kl"} <= set(records[0]), sorted(set(records[0]))
    for record in records:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if isinstance(v, float)), record
    assert records[0]["completions/max_length"] <= 6
    assert records[-1]["num_tokens"] > records[0]["num_tokens"]
    assert (workdir / rl / "adapter_model.safetensors").is_file()


def test_gdpo_and_grpo_differ_only_in_the_aggregation(workdir, tiny_model):
    a = grpo.run(load_config(write_config(workdir, tiny_model, "a", max_steps=1, test_datasets=None)))
    b = grpo.run(load_config(write_config(workdir, tiny_model, "b", max_steps=1, test_datasets=None,
                                          trl={"multi_objective_aggregation": "normalize_then_sum"})))
    c = grpo.run(load_config(write_config(workdir, tiny_model, "c", rl="gdpo", max_steps=1, test_datasets=None)))
    ra, rb, rc = (train_records(r)[0] for r in (a, b, c))
    assert ra["reward"] == rb["reward"] == rc["reward"]  # the same completions: same key, same policy
    assert rb["train/loss"] == rc["train/loss"] and ra["train/loss"] != rb["train/loss"]


def test_resume_inside_a_generation_is_bitwise(workdir, tiny_model):
    # 2 iterations over a generation of 4 slices, 2 micro-batches per step: one generation spans 4 steps,
    # the policy moves within it (old log-probs are stored), and the checkpoint at step 2 falls inside it.
    keys = dict(trl={"num_iterations": 2, "steps_per_generation": 4, "beta": 0.1}, max_steps=5, test_datasets=None,
                save_steps=10)
    straight = grpo.run(load_config(write_config(workdir, tiny_model, "straight", **keys)))
    first = grpo.run(load_config(write_config(workdir, tiny_model, "split", **keys)), stop_after_step=2)
    assert first["stopped"]
    saved = json.loads((workdir / "split" / "checkpoint-2" / "state.json").read_text())
    assert any("old_logps" in name for name in saved["carry"]["tensors"])
    resumed = grpo.run(load_config(write_config(workdir, tiny_model, "split", auto_resume_from_checkpoints=True,
                                                **keys)))
    assert train_records(resumed) == train_records(straight)
    for a, b in zip(tree_leaves(resumed["state"].trainable), tree_leaves(straight["state"].trainable)):
        assert torch.equal(a, b)


def test_full_fine_tune_with_reference_sync(workdir, tiny_model):
    result = grpo.run(load_config(write_config(
        workdir, tiny_model, "full", adapter=None, max_steps=2, test_datasets=None, learning_rate=1e-3,
        trl={"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5})))
    state = result["state"]
    name = "model.layers.0.mlp.up_proj.weight"
    ref = state.carry[f"ref/{name}"]
    assert not torch.equal(ref, state.trainable["params"][name])  # half way between, not the policy
    assert (workdir / "full" / "model" / "config.json").is_file()


def test_qlora_grpo_samples_and_trains_over_the_4bit_base(workdir, tiny_model_64):
    result = grpo.run(load_config(write_config(workdir, tiny_model_64, "qlora", adapter="qlora", load_in_4bit=True,
                                               max_steps=1, test_datasets=None, trl={"beta": 0.04})))
    record = train_records(result)[0]
    assert record["train/grad_norm"] > 0 and record["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == base
    assert (workdir / "qlora" / "adapter_model.safetensors").is_file()


def test_zero_advantage_steps_are_skipped(workdir, tiny_model):
    (workdir / "test_rewards_constant.py").write_text("def constant(completions, **kw):\n"
                                                      "    return [1.0] * len(completions)\n")
    result = grpo.run(load_config(write_config(workdir, tiny_model, "zero", max_steps=2, test_datasets=None,
                                               trl={"reward_funcs": ["test_rewards_constant.constant"],
                                                    "reward_weights": None})))
    records = train_records(result)
    assert records[-1]["skipped_zero_adv_batches"] == 2.0 and records[0]["frac_reward_zero_std"] == 1.0
    # the skips leave the adapter as initialised: LoRA B stays zero
    assert all(torch.count_nonzero(e["B"]) == 0 for e in result["state"].trainable["lora"].values())


def test_a_rollout_function_gives_the_completions(workdir, tiny_model):
    (workdir / "test_rollout_fn.py").write_text(
        "def rollout(model, processing_class, prompts, generation_config=None):\n"
        "    sampled = model.generate(prompts[:2])\n"  # the policy behind `model`, as text
        "    assert generation_config['max_tokens'] == 6 and len(sampled) == 2\n"
        "    return [str(i % 3) for i in range(len(prompts))]\n"
        "def is_zero(completions, **kw):\n"
        "    return [float(c[0]['content'] == '0') for c in completions]\n")
    result = grpo.run(load_config(write_config(workdir, tiny_model, "fn", max_steps=1, test_datasets=None, trl={
        "rollout_func": "test_rollout_fn.rollout", "reward_funcs": ["test_rollout_fn.is_zero"], "reward_weights": None})))
    record = train_records(result)[0]
    # rows 0, 3, 6 of 8 say "0"; each is one token plus EOS, so no completion is clipped
    assert record["reward"] == pytest.approx(3 / 8) and record["completions/clipped_ratio"] == 0.0
    assert record["completions/max_length"] == 2.0


def test_config_checks_come_before_anything_loads(workdir, tiny_model):
    with pytest.raises(ConfigError, match="divisible by trl.num_generations"):
        load_config(write_config(workdir, tiny_model, "x", micro_batch_size=3, gradient_accumulation_steps=1))
    with pytest.raises(ConfigError, match="vllm_sync_interval .*use_vllm"):
        load_config(write_config(workdir, tiny_model, "x", trl={"vllm_sync_interval": 2}))
    with pytest.raises(ConfigError, match="reward_weights has 1 weights for 2"):
        load_config(write_config(workdir, tiny_model, "x", trl={"reward_weights": [1.0]}))
    with pytest.raises(ConfigError, match="precompute_ref_log_probs does not apply to rl: grpo"):
        load_config(write_config(workdir, tiny_model, "x", precompute_ref_log_probs=True))
    with pytest.raises(ConfigError, match="sync_ref_model .* full fine-tune"):
        load_config(write_config(workdir, tiny_model, "x", trl={"sync_ref_model": True}))
    with pytest.raises(ConfigError, match="is a GRPO key"):
        load_config(write_config(workdir, tiny_model, "x", rl="dpo", trl={"reward_funcs": None}))


def test_a_broken_reward_function_is_one_line(workdir, tiny_model, capsys):
    (workdir / "test_rewards_broken.py").write_text("def broken(completions, **kw):\n"
                                                    "    return [1.0] * (len(completions) - 1)\n")
    path = write_config(workdir, tiny_model, "broken", test_datasets=None,
                        trl={"reward_funcs": ["test_rewards_broken.broken"], "reward_weights": None})
    with pytest.raises(SystemExit):
        grpo.main(["--config", str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "test_rewards_broken.broken returned 7 values for 8" in errors[0], err
    assert "Traceback" not in err
