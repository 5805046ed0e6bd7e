"""axolotl's own GRPO configs (the seed docs' grpo.md quick start and rlhf.md's rollout_func example)
train with the native engine: as written but for base_model (a tiny random SmolLM2-family model),
the dataset path (a local file of the same rows: GSM8K's question / answer), output_dir, max_steps
and max_completion_length (CPU time), and, for the quick start, `trl.use_vllm: false` with the keys
that only mean something to a vLLM server dropped. As written, `use_vllm: true` is one clear line."""
import json

import pytest
import yaml

from programs import train

QUICK_START = """
base_model: Qwen/Qwen2.5-1.5B-Instruct
rl: grpo
chat_template: tokenizer_default
vllm:
  host: 0.0.0.0
  port: 8000
  gpu_memory_utilization: 0.85
  dtype: auto
  max_model_len: 2048
adapter: lora
lora_r: 32
lora_alpha: 64
lora_target_linear: true
trl:
  use_vllm: true
  use_data_producer: true
  vllm_server_host: 0.0.0.0
  vllm_server_port: 8000
  vllm_server_timeout: 300
  vllm_lora_sync: true
  num_generations: 8
  max_completion_length: 512
  temperature: 0.7
  reward_funcs:
    - rewards.accuracy_reward
    - rewards.format_reward
  reward_weights:
    - 1.0
    - 0.5
datasets:
  - path: openai/gsm8k
    name: main
    type: rewards.prompt_transform
    split: train
skip_prepare_dataset: true
val_set_size: 0.0
sequence_len: 512
micro_batch_size: 2
gradient_accumulation_steps: 4
max_steps: 200
learning_rate: 5.0e-6
optimizer: adamw_torch_fused
lr_scheduler: cosine
warmup_steps: 10
bf16: true
flash_attention: true
gradient_checkpointing: true
special_tokens:
  pad_token: "<|endoftext|>"
output_dir: ./grpo-output
logging_steps: 1
"""

REWARDS_PY = '''
import re

def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    rewards = []
    for completion, correct in zip(completions, answer):
        numbers = re.findall(r"-?\\d+(?:\\.\\d+)?", completion[0]["content"])
        rewards.append(1.0 if (numbers[-1] if numbers else "") == str(correct) else 0.0)
    return rewards

def format_reward(completions, **kwargs) -> list[float]:
    return [1.0 if "<think>" in c[0]["content"] and "<answer>" in c[0]["content"] else 0.0 for c in completions]

def prompt_transform(cfg, *args, **kwargs):
    def transform_fn(example, tokenizer=None):
        label = example["answer"].split("####")[-1].strip().replace(",", "")
        return {"prompt": [{"role": "system", "content": "Solve the math problem."},
                           {"role": "user", "content": example["question"]}], "answer": label}
    return transform_fn, {"remove_columns": ["question"]}
'''

ROLLOUT_EXAMPLE = """
rl: grpo
trl:
  beta: 0.001
  max_completion_length: 512
  num_generations: 4
  rollout_func: "math_env.math_solver_rollout"
  reward_funcs: ["math_env.math_reward"]
  reward_weights: [1.0]
datasets:
  - path: openai/gsm8k
    name: main
    type: math_env.math_transform
"""

MATH_ENV_PY = '''
def math_solver_rollout(model, processing_class, prompts, generation_config=None):
    return [f"The answer is {i % 4}" for i, p in enumerate(prompts)]

def math_reward(completions, answer, **kwargs):
    return [1.0 if c[0]["content"].endswith("0") else 0.0 for c, a in zip(completions, answer)]

def math_transform(cfg, *args, **kwargs):
    def transform_fn(example, processing_class=None):
        return {"prompt": [{"role": "user", "content": example["question"]}], "answer": str(example["answer"])}
    return transform_fn, {"remove_columns": ["question"]}
'''


@pytest.fixture
def gsm8k_like(tmp_path, monkeypatch):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?", "answer": f"{a} + {b}\\n#### {a + b}"}
            for a, b in zip(range(3, 19), range(20, 36))]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    (tmp_path / "math_env.py").write_text(MATH_ENV_PY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def local(raw, tmp_path, tiny_model, name):
    raw = dict(raw, base_model=str(tiny_model), output_dir=str(tmp_path / name), max_steps=2,
               micro_batch_size=raw.get("micro_batch_size", 4), sequence_len=raw.get("sequence_len", 256),
               learning_rate=raw.get("learning_rate", 1e-5))
    raw["trl"] = dict(raw["trl"], max_completion_length=8)
    raw["datasets"] = [dict(d, path=str(tmp_path / "gsm8k.jsonl")) for d in raw["datasets"]]
    for d in raw["datasets"]:
        d.pop("name", None)  # the GSM8K config name; the local file has one
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_quick_start_trains_through_vllm_and_natively(gsm8k_like, tiny_model, vllm_server):
    raw = yaml.safe_load(QUICK_START)
    # as written, but at the run's vLLM server (its tiny model, on its port)
    served = dict(raw, vllm=dict(raw["vllm"], host=vllm_server.host, port=vllm_server.port),
                  trl=dict(raw["trl"], vllm_server_host=vllm_server.host, vllm_server_port=vllm_server.port))
    assert train.main(["--config", str(local(served, gsm8k_like, vllm_server.model, "vllm"))]) == 0
    records = [json.loads(line) for line in (gsm8k_like / "vllm" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "sampling/importance_sampling_ratio/mean" in records[-1]
    raw.pop("vllm")
    raw["trl"] = {k: v for k, v in raw["trl"].items() if not k.startswith("vllm") and k != "use_data_producer"}
    raw["trl"]["use_vllm"] = False
    assert train.main(["--config", str(local(raw, gsm8k_like, tiny_model, "native"))]) == 0
    records = [json.loads(line) for line in (gsm8k_like / "native" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "rewards/accuracy_reward/mean" in records[0]
    assert (gsm8k_like / "native" / "adapter_model.safetensors").is_file()


def test_the_rollout_func_example_trains(gsm8k_like, tiny_model):
    raw = yaml.safe_load(ROLLOUT_EXAMPLE)
    assert train.main(["--config", str(local(raw, gsm8k_like, tiny_model, "rollout"))]) == 0
    records = [json.loads(line) for line in (gsm8k_like / "rollout" / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in records[0] and records[0]["completions/clipped_ratio"] == 0.0
