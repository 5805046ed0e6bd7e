"""The config schema: axolotl's keys and defaults, overrides, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import re

import pytest
import yaml

from programs.config import (
    NOT_SUPPORTED_YET,
    SUPPORTED_OPTIMIZERS,
    Config,
    ConfigError,
    DatasetConfig,
    apply_overrides,
    data_settings,
    help_text,
    load_config,
    parse_cli,
    training_kind,
    validate,
    write_resolved_config,
)
from programs.config.validate import _model_of
from pure.data.settings import DataSettings

EXAMPLES = sorted(Path("/work/shared/compat/axolotl-examples").glob("*.y*ml"))
MINIMAL = {"base_model": "smollm2-135m-instruct", "learning_rate": 2e-4,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_documented_defaults_are_filled():
    c = validate(MINIMAL)
    assert c.sequence_len == 512
    assert c.micro_batch_size == 1 and c.gradient_accumulation_steps == 1 and c.batch_size == 1
    assert c.num_epochs == 1.0 and c.max_steps is None
    assert c.optimizer == "adamw_torch_fused" and c.lr_scheduler == "cosine"
    assert c.weight_decay == 0.0 and c.lora_dropout == 0.0
    assert c.bf16 == "auto" and c.tf32 == "auto"
    assert c.train_on_inputs is False and c.val_set_size == 0.0
    assert c.shuffle_merged_datasets is True and c.shuffle_before_merging_datasets is False
    assert c.output_dir == "./model-out" and c.dataset_prepared_path is None
    assert c.excess_length_strategy == "drop" and c.min_sample_len == 2
    assert c.sample_packing_group_size == 100000 and c.sample_packing_bin_size == 200
    assert c.gradient_checkpointing is False and c.save_safetensors is True
    assert c.rl is None and training_kind(c) == "sft"


def test_learning_rate_in_yaml_exponent_form_is_a_float(tmp_path):
    # PyYAML reads `2e-5` as a string; axolotl accepts it, so must we
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\nlearning_rate: 2e-5\n")
    assert load_config(path).learning_rate == pytest.approx(2e-5)


def test_batch_size_is_micro_times_accumulation():
    c = validate({**MINIMAL, "micro_batch_size": 4, "gradient_accumulation_steps": 8})
    assert c.batch_size == 32 and c.eval_batch_size == 4


def test_batch_size_alone_derives_gradient_accumulation():
    c = validate({**MINIMAL, "micro_batch_size": 2, "batch_size": 16})
    assert c.gradient_accumulation_steps == 8 and c.batch_size == 16


def test_derived_values():
    c = validate({**MINIMAL, "sample_packing": True, "trl": {"beta": 0.3}, "model_type": "AutoModelForCausalLM",
                  "chat_template_jinja": "{{ messages }}"})
    assert c.pad_to_sequence_len is True and c.eval_sample_packing is True
    assert c.rl_beta == 0.3 and c.trl.beta == 0.3
    assert c.type_of_model == "AutoModelForCausalLM"
    assert c.chat_template == "jinja"
    assert validate({**MINIMAL, "dpo_beta": 0.2}).rl_beta == 0.2  # legacy spelling


@pytest.mark.parametrize("flags", [
    ["--learning_rate", "1e-4"],
    ["--learning-rate", "1e-4"],
    ["--learning-rate=1e-4"],
    ["--learning_rate=0.0001"],
])
def test_overrides_underscore_kebab_and_equals_forms(tmp_path, flags):
    assert load_config(write(tmp_path, MINIMAL), flags).learning_rate == pytest.approx(1e-4)


def test_dotted_overrides_reach_nested_blocks_and_list_entries(tmp_path):
    c = load_config(write(tmp_path, {**MINIMAL, "rl": "dpo"}), ["--trl.beta", "0.1", "--trl.loss-type=ipo",
                                               "--datasets.0.split", "train[:10%]"])
    assert c.trl.beta == 0.1 and c.trl.loss_type == "ipo"
    assert c.datasets[0].split == "train[:10%]"


def test_override_values_are_yaml_scalars(tmp_path):
    c = load_config(write(tmp_path, MINIMAL), ["--sample-packing", "true", "--lora-target-modules", "[q_proj, v_proj]",
                                               "--eval-steps", "0.25", "--wandb-name", "123"])
    assert c.sample_packing is True and c.lora_target_modules == ["q_proj", "v_proj"]
    assert c.eval_steps == 0.25 and c.wandb_name == "123"


def test_bare_boolean_flag_means_true_and_null_is_dropped(tmp_path):
    c = load_config(write(tmp_path, MINIMAL), ["--sample-packing", "--seed", "null"])
    assert c.sample_packing is True and c.seed == 42  # null means the default


def test_unknown_key_suggests_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"'lora_alhpa'.*did you mean 'lora_alpha'"):
        validate({**MINIMAL, "lora_alhpa": 16})
    with pytest.raises(ConfigError, match=r"trl.betta.*did you mean 'beta'"):
        validate({**MINIMAL, "trl": {"betta": 0.1}})
    with pytest.raises(ConfigError, match=r"datasets\[0\].feild_messages.*did you mean 'field_messages'"):
        validate({**MINIMAL, "datasets": [{"path": "d.jsonl", "type": "chat_template", "feild_messages": "m"}]})


def test_unknown_override_suggests_too(tmp_path):
    with pytest.raises(ConfigError, match=r"--learning-rte.*did you mean 'learning_rate'"):
        load_config(write(tmp_path, MINIMAL), ["--learning-rte", "1"])


def test_dataset_entries_keep_extra_options_for_the_strategy():
    c = validate({**MINIMAL, "datasets": [{"path": "d.jsonl", "type": "my_transforms.fn", "my_option": 3}]})
    assert c.datasets[0].to_dict() == {"path": "d.jsonl", "type": "my_transforms.fn", "my_option": 3}


@pytest.mark.parametrize("raw, pattern", [
    ({"learning_rate": 0}, r"learning_rate: expected float \(> 0\), got 0"),
    ({"learning_rate": -1e-4}, r"learning_rate: expected float \(> 0\)"),
    ({"micro_batch_size": 0}, r"micro_batch_size: expected int \(>= 1\), got 0"),
    ({"gradient_accumulation_steps": "many"}, r"gradient_accumulation_steps: expected int"),
    ({"sequence_len": 1.5}, r"sequence_len: expected int"),
    ({"lora_dropout": 1.5}, r"lora_dropout: expected float \(>= 0, < 1\)"),
    ({"warmup_ratio": 2}, r"warmup_ratio: expected float \(>= 0, <= 1\)"),
    ({"bf16": "maybe"}, r"bf16: expected 'auto' \| 'full' \| bool"),
    ({"lr_scheduler": "cosin"}, r"lr_scheduler: .*did you mean 'cosine'"),
    ({"optimizer": "adamw_trch"}, r"optimizer: unknown optimizer 'adamw_trch'; did you mean 'adamw_torch'"),
    ({"rl": "dpoo"}, r"rl: .*did you mean 'dpo'"),
    ({"datasets": [{"path": "d", "shards": 2, "shards_idx": 2}]}, r"datasets\[0\].shards_idx: expected an index < shards"),
    ({"datasets": [{"type": "alpaca"}]}, r"datasets\[0\].path is required"),
    ({"datasets": []}, r"datasets"),
])
def test_wrong_types_and_out_of_range_values_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate({**MINIMAL, **raw})


def test_required_keys():
    with pytest.raises(ConfigError, match="base_model is required"):
        validate({"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="learning_rate is required"):
        validate({"base_model": "m"})


@pytest.mark.parametrize("raw, pattern", [
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio cannot both be set"),
    ({"val_set_size": 0.1, "test_datasets": [{"path": "t.jsonl", "type": "alpaca"}]},
     "val_set_size .* and test_datasets cannot both be set"),
    ({"eval_steps": 10, "evals_per_epoch": 2}, "eval_steps and evals_per_epoch"),
    ({"save_steps": 10, "saves_per_epoch": 2}, "save_steps and saves_per_epoch"),
    ({"rl": "dpo", "sample_packing": True}, "needs sample_packing: false"),
    ({"bf16": True, "fp16": True}, "bf16 .* and fp16 cannot both be set"),
    ({"micro_batch_size": 3, "batch_size": 16}, "batch_size: expected a multiple of micro_batch_size"),
])
def test_conflicting_keys(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate({**MINIMAL, **raw})


def test_test_datasets_with_zero_val_set_size_is_fine():
    c = validate({**MINIMAL, "val_set_size": 0, "test_datasets": [{"path": "t.jsonl", "type": "alpaca"}]})
    assert c.test_datasets[0].path == "t.jsonl"


@pytest.mark.parametrize("key, value", [
    ("deepcompile", True), ("use_ray", True), ("gptq", True), ("liger_use_token_scaling", True),
    ("lora_embedding_kernel", True), ("use_sonicmoe", True), ("unsloth_lora_mlp", True), ("xformers_attention", True),
    ("optimizer", "galore_adamw"),
])
def test_features_not_built_yet_fail_with_one_clear_line(key, value):
    with pytest.raises(ConfigError, match=f"{key} is not supported yet by puretune"):
        validate({**MINIMAL, key: value})


def test_not_supported_keys_at_their_default_are_accepted():
    c = validate({**MINIMAL, "load_in_4bit": False, "load_in_8bit": False, "deepspeed": None,
                  "context_parallel_size": 1, "adapter": "lora", "gradient_checkpointing": True})
    assert c.adapter == "lora"


def test_every_not_supported_key_exists_in_the_schema():
    for dotted in NOT_SUPPORTED_YET:
        block, _, key = dotted.rpartition(".")
        model = DatasetConfig if block == "datasets" else (_model_of(Config.model_fields[block].annotation)
                                                          if block else Config)
        assert key in model.model_fields, dotted
    assert set(SUPPORTED_OPTIMIZERS) <= set(Config.model_fields["optimizer"].annotation.__args__)


def _example_raw(path: Path, tmp_path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    raw["base_model"] = "smollm2-135m-instruct"
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for entry in raw.get(key) or []:
            entry["path"] = str(tmp_path / "data.jsonl")
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_axolotl_examples_validate_or_name_the_missing_feature(path, tmp_path):
    raw = _example_raw(path, tmp_path)
    raw.pop("test_value", None)  # a stray key in one upstream example: refused by name (unknown key) otherwise
    try:
        config = validate(raw)
    except ConfigError as err:
        assert "is not supported yet by puretune" in str(err), str(err)
    else:
        assert config.base_model == "smollm2-135m-instruct"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_axolotl_examples_validate_once_unbuilt_features_are_off(path, tmp_path):
    """Dropping each key validation names as not supported yet, one at a time, leaves a valid config:
    nothing else in a real axolotl config trips the schema."""
    raw = _example_raw(path, tmp_path)
    for _ in range(len(NOT_SUPPORTED_YET)):
        try:
            config = validate(raw)
            break
        except ConfigError as err:
            match = re.match(r"(\w+)(?:\[(\d+)\])?(?:\.(\w+))? is not supported yet by puretune", str(err))
            assert match, str(err)
            key, index, inner = match.groups()
            if index is not None:
                raw[key][int(index)].pop(inner)
            elif inner is not None:
                raw[key].pop(inner)
            else:
                raw.pop(key)
    assert config.learning_rate > 0


def test_example_keys_round_trip_through_write_resolved_config(tmp_path):
    c = validate({**MINIMAL, "special_tokens": {"pad_token": "<|pad|>"}, "added_tokens_overrides": {4: "<x>"},
                  "lr_groups": [{"name": "emb", "modules": ["embed_tokens"], "lr": 1e-5}]})
    written = write_resolved_config(c, tmp_path / "out")
    again = validate(yaml.safe_load(written.read_text()))
    assert again.to_dict() == c.to_dict()
    assert again.special_tokens.pad_token == "<|pad|>"


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: m\nlearning_rate: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_cli_splits_config_overrides_and_program_flags(tmp_path):
    path = write(tmp_path, MINIMAL)
    config, extra = parse_cli(["--config", str(path), "--debug", "--micro-batch-size", "2",
                               "--debug-num-examples", "3"],
                              "d", program_flags={"--debug": False, "--debug-num-examples": True})
    assert config.micro_batch_size == 2
    assert extra == ["--debug", "--debug-num-examples", "3"]
    config, _ = parse_cli([str(path)], "d")  # axolotl's positional form
    assert config.base_model == MINIMAL["base_model"]
    with pytest.raises(ConfigError, match="--config is required"):
        parse_cli(["--debug"], "d", program_flags={"--debug": False})


def test_help_lists_keys_with_types_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(["--help"], "Prepare data.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == help_text("Prepare data.") + "\n"
    assert "--learning-rate" in out and "float (> 0); required" in out
    assert "--sequence-len" in out and "default 512" in out
    assert "--load-in-4bit" in out and "[not supported yet]" in out


def test_data_settings_takes_the_global_data_keys(tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    c = validate({**MINIMAL, "sequence_len": 1024, "train_on_inputs": True, "chat_template": "jinja",
                  "chat_template_jinja": str(jinja), "eot_tokens": ["<|im_end|>"], "seed": 7,
                  "excess_length_strategy": "truncate", "default_system_message": "Be brief."})
    s = data_settings(c)
    assert isinstance(s, DataSettings)
    assert s.sequence_len == 1024 and s.train_on_inputs is True and s.seed == 7
    assert s.chat_template == "jinja" and s.chat_template_jinja.startswith("{% for m")
    assert s.eot_tokens == ("<|im_end|>",) and s.excess_length_strategy == "truncate"
    assert s.default_system_message == "Be brief."
    assert data_settings(validate(MINIMAL)).seed == 42


def test_training_kind():
    assert training_kind(validate({**MINIMAL, "rl": "kto"})) == "kto"
    assert training_kind(validate({**MINIMAL, "reward_model": True})) == "rm"
    assert training_kind(validate({**MINIMAL, "process_reward_model": True})) == "prm"
    assert training_kind(validate({**MINIMAL, "rl": "reward_trainer"})) == "rm"


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"base_model": "m", "trl": {"beta": 0.5}}
    apply_overrides(raw, ["--trl.beta", "0.1"])
    assert raw["trl"]["beta"] == 0.5
    out = apply_overrides({"base_model": "m"}, ["--base-model", "x"])
    assert out["base_model"] == "x"


def test_a_bare_trl_key_on_the_command_line_sets_it_under_trl(tmp_path):
    """`--use_vllm true` (the GRPO docs' form) is `--trl.use_vllm true`; a top-level key keeps its meaning."""
    out = apply_overrides({"base_model": "m", "trl": {"beta": 0.5}}, ["--use_vllm", "true", "--num-generations=4",
                                                                      "--vllm_lora_sync"])
    assert out["trl"] == {"beta": 0.5, "use_vllm": True, "num_generations": 4, "vllm_lora_sync": True}
    assert "use_vllm" not in out
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError, match="trl.use_vllm is a GRPO key"):  # it reached trl: and its checks
        parse_cli(["--config", str(path), "--use_vllm", "false", "--seed", "3"], "d")
    with pytest.raises(ConfigError, match="unknown option '--use_vllmm'"):
        parse_cli(["--config", str(path), "--use_vllmm", "true"], "d")
