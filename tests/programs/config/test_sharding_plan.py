"""sharding_plan: axolotl's DDP / FSDP / DeepSpeed keys (multi-gpu.md, nd_parallelism.md) read into
one plain ShardingPlan, through the same validate path a YAML file takes."""
from __future__ import annotations

import json

import pytest
import yaml

from programs.config import ConfigError, validate
from programs.config.derived import ShardingPlan, sharding_plan

MINIMAL = {"base_model": "smollm2-135m-instruct", "learning_rate": 2e-4,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}

# the shapes of axolotl's bundled deepspeed_configs/
ZERO1 = {"zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": "auto"},
         "fp16": {"enabled": "auto", "loss_scale": 0}, "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "wall_clock_breakdown": False}
ZERO2 = {**ZERO1, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                        "contiguous_gradients": True, "overlap_comm": True}}
ZERO3 = {**ZERO1, "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                        "sub_group_size": 0, "reduce_bucket_size": "auto",
                                        "stage3_gather_16bit_weights_on_model_save": True}}
ZERO3_CPUOFFLOAD_ALL = {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"],
                                                       "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                                       "offload_param": {"device": "cpu", "pin_memory": True}}}


def plan_of(raw: dict) -> ShardingPlan:
    return sharding_plan(validate({**MINIMAL, **raw}))


def from_yaml(text: str) -> ShardingPlan:
    return plan_of(yaml.safe_load(text))


def write_json(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return str(path)


def test_no_distributed_key_is_ddp_with_nothing_sharded():
    plan = plan_of({})
    assert plan == ShardingPlan("ddp")
    assert not (plan.shard_params or plan.shard_grads or plan.shard_optimizer or plan.offload_params)
    assert plan.state_dict_type == plan.final_state_dict_type == "FULL_STATE_DICT"
    assert plan.lines == ()


def test_ddp_keys_and_timeout():
    plan = plan_of({"ddp": True, "ddp_timeout": 7200, "dp_replicate_size": 2, "ddp_find_unused_parameters": True})
    assert plan.strategy == "ddp" and plan.timeout_s == 7200 and plan.dp_replicate == 2 and plan.dp_shard is None


def test_fsdp2_config_is_read_by_its_names():
    plan = from_yaml("""
fsdp_version: 2
fsdp_config:
  offload_params: true
  cpu_ram_efficient_loading: true
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  state_dict_type: SHARDED_STATE_DICT
  reshard_after_forward: false
  activation_checkpointing: true
  cpu_offload_pin_memory: false
dp_shard_size: 4
dp_replicate_size: 2
""")
    assert plan.strategy == "fsdp2"
    assert plan.shard_params and plan.shard_grads and plan.shard_optimizer
    assert plan.reshard_after_forward is False
    assert plan.offload_params and plan.offload_optimizer and plan.offload_pin_memory is False
    assert plan.activation_checkpointing and plan.cpu_ram_efficient_loading
    assert plan.state_dict_type == "SHARDED_STATE_DICT" and plan.final_state_dict_type == "FULL_STATE_DICT"
    assert (plan.dp_shard, plan.dp_replicate, plan.tp, plan.cp) == (4, 2, None, None)
    assert plan.lines[0] == ("fsdp_config: run as DTensor sharding of params, gradients and optimizer state "
                             "(FSDP2, reshard_after_forward: false)")
    assert any("auto_wrap_policy" in line and "no effect" in line for line in plan.lines)
    assert not any("FSDP1" in line for line in plan.lines)


def test_fsdp2_defaults_reshard_after_forward_like_zero3():
    plan = plan_of({"fsdp_version": 2, "fsdp_config": {"offload_params": False}})
    assert plan.reshard_after_forward is True and not plan.offload_params and plan.offload_pin_memory


def test_an_empty_fsdp_config_is_fsdp2_with_its_defaults():
    plan = plan_of({"fsdp_version": 2, "fsdp_config": {}})
    assert plan.strategy == "fsdp2" and plan.shard_params and plan.reshard_after_forward
    assert plan.lines[0].startswith("fsdp_config: run as DTensor sharding")


def test_final_state_dict_type_from_the_block_or_the_top_level_key():
    assert plan_of({"fsdp_version": 2, "fsdp_config": {"final_state_dict_type": "SHARDED_STATE_DICT"}}
                   ).final_state_dict_type == "SHARDED_STATE_DICT"
    assert plan_of({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True},
                    "fsdp_final_state_dict_type": "SHARDED_STATE_DICT"}).final_state_dict_type == "SHARDED_STATE_DICT"
    with pytest.raises(ConfigError, match="fsdp_final_state_dict_type"):
        plan_of({"fsdp_version": 2, "fsdp_config": {"final_state_dict_type": "FULL_STATE_DICT"},
                 "fsdp_final_state_dict_type": "SHARDED_STATE_DICT"})


def test_fsdp1_config_translates_as_the_migration_table_says():
    # multi-gpu.md's FSDP1 example, which it migrates to the FSDP2 config above
    plan = from_yaml("""
fsdp_version: 1
fsdp_config:
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen3DecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_sync_module_states: true
  fsdp_use_orig_params: false
  fsdp_backward_prefetch: BACKWARD_PRE
""")
    migrated = from_yaml("""
fsdp_version: 2
fsdp_config:
  offload_params: false
  cpu_ram_efficient_loading: true
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: Qwen3DecoderLayer
  state_dict_type: FULL_STATE_DICT
  reshard_after_forward: true
""")
    assert plan.strategy == "fsdp2"
    assert {k: v for k, v in vars(plan).items() if k != "lines"} == \
        {k: v for k, v in vars(migrated).items() if k != "lines"}
    text = "\n".join(plan.lines)
    assert "fsdp_version 1: FSDP1's keys are read as FSDP2's" in text
    assert "fsdp_offload_params -> offload_params" in text
    assert "fsdp_config.fsdp_sharding_strategy: FULL_SHARD read as reshard_after_forward: true" in text
    for removed in ("fsdp_sync_module_states", "fsdp_use_orig_params", "fsdp_backward_prefetch"):
        assert f"fsdp_config.{removed}: removed in FSDP2; no effect" in plan.lines


@pytest.mark.parametrize("strategy, strategy_name, reshard", [
    ("FULL_SHARD", "fsdp2", True), ("SHARD_GRAD_OP", "fsdp2", False), ("HYBRID_SHARD", "fsdp2", True),
    ("NO_SHARD", "ddp", False),
])
def test_fsdp1_sharding_strategies(strategy, strategy_name, reshard):
    plan = plan_of({"fsdp_config": {"fsdp_sharding_strategy": strategy}})
    assert plan.strategy == strategy_name and plan.reshard_after_forward is reshard
    assert plan.shard_params is (strategy_name == "fsdp2")
    assert any("fsdp_version unset" in line for line in plan.lines)
    if strategy == "HYBRID_SHARD":
        assert any("HSDP" in line and "dp_replicate_size" in line for line in plan.lines)


def test_legacy_fsdp_list():
    plan = from_yaml("""
fsdp:
  - full_shard
  - auto_wrap
  - offload
fsdp_config:
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
""")
    assert plan.strategy == "fsdp2" and plan.reshard_after_forward and plan.offload_params
    assert plan.lines[0].startswith("fsdp_config: run as DTensor sharding")
    assert any("the deprecated list" in line for line in plan.lines)
    assert plan_of({"fsdp": ["full_shard"]}).lines[0].startswith("fsdp: run as DTensor sharding")
    assert plan_of({"fsdp": ["shard_grad_op"]}).reshard_after_forward is False
    assert plan_of({"fsdp": ["no_shard"]}).strategy == "ddp"
    with pytest.raises(ConfigError, match=r"fsdp\[1\].*full_shard"):
        plan_of({"fsdp": ["full_shard", "shard_grad_op"]})
    with pytest.raises(ConfigError, match=r"fsdp\[0\]: expected one of .*'size_wrap'"):
        plan_of({"fsdp": ["size_wrap"]})


@pytest.mark.parametrize("name, content, stage, sharded", [
    ("zero1.json", ZERO1, 1, (False, False, True)),
    ("zero2.json", ZERO2, 2, (False, True, True)),
    ("zero3.json", ZERO3, 3, (True, True, True)),
])
def test_deepspeed_stages_from_a_file(tmp_path, name, content, stage, sharded):
    plan = plan_of({"deepspeed": write_json(tmp_path, name, content)})
    assert plan.strategy == "deepspeed"
    assert (plan.shard_params, plan.shard_grads, plan.shard_optimizer) == sharded
    assert plan.reshard_after_forward is (stage == 3)
    assert plan.state_dict_type == "SHARDED_STATE_DICT" and plan.final_state_dict_type == "FULL_STATE_DICT"
    assert plan.lines[0].endswith(f"(ZeRO-{stage})") and plan.lines[0].startswith(f"deepspeed {name}: run as")
    assert any("bf16 / fp16: no effect" in line for line in plan.lines)
    assert any("overlap_comm" in line and "no effect" in line for line in plan.lines)
    assert not any("is not read" in line for line in plan.lines)  # "auto" values are the config's own


def test_zero2_says_what_it_shards():
    plan = plan_of({"deepspeed": ZERO2})
    assert plan.lines[0] == "deepspeed: run as DTensor sharding of gradients and optimizer state (ZeRO-2)"
    assert plan.offload_optimizer and not plan.offload_params


@pytest.mark.parametrize("stage, sharded", [(1, (False, False, True)), (2, (False, True, True)),
                                            (3, (True, True, True))])
def test_deepspeed_stages_from_a_mapping(stage, sharded):
    plan = plan_of({"deepspeed": {"zero_optimization": {"stage": stage}}})
    assert (plan.shard_params, plan.shard_grads, plan.shard_optimizer) == sharded


def test_deepspeed_zero0_shards_nothing():
    plan = plan_of({"deepspeed": {"zero_optimization": {"stage": 0}}})
    assert plan.strategy == "deepspeed" and not plan.shard_optimizer and plan.state_dict_type == "FULL_STATE_DICT"
    assert "DDP (ZeRO-0 shards nothing)" in plan.lines[0]


def test_deepspeed_relative_path_is_read_from_the_working_directory(tmp_path, monkeypatch):
    write_json(tmp_path, "zero3.json", ZERO3)
    monkeypatch.chdir(tmp_path)
    assert plan_of({"deepspeed": "zero3.json"}).shard_params


def test_deepspeed_cpu_offload():
    plan = plan_of({"deepspeed": ZERO3_CPUOFFLOAD_ALL})
    assert plan.offload_params and plan.offload_optimizer and plan.offload_pin_memory
    params_only = plan_of({"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}})
    assert params_only.offload_params and not params_only.offload_optimizer
    below_3 = plan_of({"deepspeed": {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}})
    assert not below_3.offload_params and any("no effect below ZeRO-3" in line for line in below_3.lines)
    none = plan_of({"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}})
    assert not none.offload_params


def test_deepspeed_final_export_follows_gather_16bit_weights():
    assert plan_of({"deepspeed": ZERO3}).final_state_dict_type == "FULL_STATE_DICT"
    plan = plan_of({"deepspeed": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}})
    assert plan.final_state_dict_type == "SHARDED_STATE_DICT"


def test_deepspeed_values_the_config_sets_get_a_line():
    plan = plan_of({"deepspeed": {**ZERO1, "train_micro_batch_size_per_gpu": 4}})
    assert "deepspeed: train_micro_batch_size_per_gpu: 4 is not read; micro_batch_size sets it" in plan.lines


@pytest.mark.parametrize("raw, pattern", [
    ({"deepspeed": {"zero_optimization": {"stage": 3}}, "fsdp_config": {"reshard_after_forward": True}},
     "deepspeed and fsdp_config cannot both be set"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}, "fsdp": ["full_shard"]}, "deepspeed and fsdp cannot both be set"),
    ({"fsdp_version": 2, "fsdp_config": {"offload_param": True}}, r"fsdp_config\.offload_param: unknown FSDP option"),
    ({"fsdp_version": 2, "fsdp_config": {"offload_params": "yes"}}, r"fsdp_config\.offload_params: expected true or false"),
    ({"fsdp_version": 3, "fsdp_config": {"offload_params": True}}, "fsdp_version: expected 1 or 2"),
    ({"fsdp_version": 2}, "fsdp_version: 2 is set but FSDP is not"),
    ({"fsdp_config": {"fsdp_sharding_strategy": "ZERO3"}}, r"fsdp_config\.fsdp_sharding_strategy: expected one of"),
    ({"fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD", "reshard_after_forward": False}},
     "fsdp_sharding_strategy and fsdp_config.reshard_after_forward both set"),
    ({"fsdp_config": {"fsdp_offload_params": True, "offload_params": False}},
     r"fsdp_config\.offload_params repeats fsdp_config\.fsdp_offload_params"),
    ({"fsdp_version": 2, "fsdp_config": {"state_dict_type": "FULL"}}, r"fsdp_config\.state_dict_type: expected one of"),
    ({"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "NO_WRAP"}}, r"fsdp_config\.auto_wrap_policy: expected one of"),
    ({"fsdp_final_state_dict_type": "FULL_STATE_DICT"}, "fsdp_final_state_dict_type applies to FSDP"),
    ({"dp_shard_size": 0}, "dp_shard_size: expected a positive integer, got 0"),
    ({"dp_replicate_size": -2}, "dp_replicate_size: expected a positive integer"),
    ({"ddp_timeout": 0}, "ddp_timeout: expected a positive integer"),
    ({"dp_shard_size": 2}, "dp_shard_size: 2 shards the model with FSDP, but this config runs ddp"),
    ({"deepspeed": {"zero_optimization": {"stage": 4}}}, r"deepspeed: zero_optimization\.stage: expected 0, 1, 2 or 3"),
    ({"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}},
     r"zero_optimization\.offload_param\.device: nvme is not supported"),
    ({"deepspeed": {"optimizer": {"type": "AdamW"}}}, "deepspeed: its optimizer block would replace the config's"),
])
def test_errors_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        plan_of(raw)


def test_a_missing_or_invalid_deepspeed_file_is_named(tmp_path):
    missing = str(tmp_path / "zero9.json")
    with pytest.raises(ConfigError, match=f"deepspeed: {missing} not found"):
        plan_of({"deepspeed": missing})
    broken = write_json(tmp_path, "broken.json", "{not json")
    with pytest.raises(ConfigError, match=f"deepspeed: {broken} is not a readable JSON file"):
        plan_of({"deepspeed": broken})
    a_list = write_json(tmp_path, "list.json", [1, 2])
    with pytest.raises(ConfigError, match=f"deepspeed: {a_list} must hold a JSON object"):
        plan_of({"deepspeed": a_list})


def test_tensor_and_context_parallelism_are_read_and_deepcompile_stays_refused():
    assert plan_of({"fsdp_version": 2, "fsdp_config": {}, "tensor_parallel_size": 2}).tp == 2
    assert plan_of({"fsdp_version": 2, "fsdp_config": {}, "context_parallel_size": 2}).cp == 2
    with pytest.raises(ConfigError, match="deepcompile is not supported yet by puretune"):
        plan_of({"deepspeed": {"zero_optimization": {"stage": 3}}, "deepcompile": True})
