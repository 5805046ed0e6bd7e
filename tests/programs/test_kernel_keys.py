"""axolotl's kernel plugins and keys, set through YAML, are served by puretune's kernels: the startup
line names the kernel, the served op computes the reference's values, false selects the reference,
and a plugin puretune does not serve is refused with one line naming it."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from kernels import reference_model_ops, select_model_ops
from programs.config import ConfigError, load_config, validate
from programs.kernel_keys import KEY_OPS, served_ops
from programs.sft import run
from pure.linear_ce import reference_token_logprobs
from pure.lora import LoraConfig, lora_linear
from pure.models.llama import rms_norm, sdpa_attention, swiglu

LIGER = "axolotl.integrations.liger.LigerPlugin"
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
KERNELS = "axolotl.integrations.kernels.KernelsPlugin"
CPU, F32 = torch.device("cpu"), torch.float32
REPO = Path(__file__).resolve().parents[2]
ROWS = (REPO / "configs" / "data" / "arithmetic_train.jsonl").read_text().splitlines()[:8]


def config_from_yaml(tmp_path: Path, **keys):
    raw = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-3, "adapter": "lora",
           "lora_target_linear": True, "datasets": [{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}]}
    raw.update(keys)
    path = tmp_path / "kernels.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def same(fn, other) -> bool:
    """One function (a partial compares by its function and bound options; two partials are never `is`)."""
    unwrap = lambda f: (f.func, f.keywords) if isinstance(f, functools.partial) else (f, {})
    return unwrap(fn) == unwrap(other)


def same_ops(ops, others) -> bool:
    return ops.keys() == others.keys() and all(same(ops[name], others[name]) for name in ops)


def line_for(tmp_path, **keys) -> tuple[dict, str]:
    return served_ops(config_from_yaml(tmp_path, **keys), CPU, F32)


# --- the startup line names our kernel --------------------------------------------------------------


def test_liger_plugin_keys_are_served_by_our_kernels(tmp_path):
    ops, line = line_for(tmp_path, plugins=[LIGER], liger_rms_norm=True, liger_glu_activation=True,
                         liger_fused_linear_cross_entropy=True, liger_rope=True, liger_layer_norm=True)
    assert line.startswith("kernel keys: plugins LigerPlugin: served by puretune's kernels")
    assert f"liger_rms_norm: served by kernels.rmsnorm ({ops['rms_norm_fn'].__name__} on cpu float32)" in line
    assert f"liger_glu_activation: served by kernels.swiglu ({ops['swiglu_fn'].__name__} on cpu float32)" in line
    assert "liger_fused_linear_cross_entropy: served by kernels.linear_ce (chunked_token_logprobs(" in line
    assert "liger_rope: served by pure.models.llama.apply_rope in the forward (kernels/ has no fused rope)" in line
    assert "liger_layer_norm: nothing to serve: Llama-family models have no LayerNorm" in line


def test_cut_cross_entropy_plugin_turns_its_key_on_and_is_served_by_linear_ce(tmp_path):
    ops, line = line_for(tmp_path, plugins=[CCE])
    assert "cut_cross_entropy: served by kernels.linear_ce (chunked_token_logprobs(" in line
    assert ops["token_logprob_fn"].func.__module__ == "kernels.linear_ce"
    _, off = line_for(tmp_path, plugins=[CCE], cut_cross_entropy=False)
    assert "cut_cross_entropy: false: the plain-torch reference pure.linear_ce.reference_token_logprobs" in off


def test_kernels_plugin_serves_use_kernels_with_rmsnorm_and_says_rope_is_the_forwards(tmp_path):
    _, line = line_for(tmp_path, plugins=[KERNELS])
    assert "use_kernels: RMSNorm served by kernels.rmsnorm" in line
    assert "the rotary embedding pure.models.llama.apply_rope in the forward" in line


def test_under_torch_compile_the_line_says_the_compiled_reference_serves_the_key(tmp_path):
    ops, line = line_for(tmp_path, liger_rms_norm=True, torch_compile=True)
    assert ops == {}  # make_apply's defaults: the references, which Inductor compiles
    assert "liger_rms_norm: served by the reference pure.models.llama.rms_norm, compiled by Inductor" in line


def test_no_kernel_key_and_no_plugin_prints_nothing(tmp_path):
    ops, line = line_for(tmp_path)
    assert line is None and same_ops(ops, select_model_ops(CPU, F32))


def test_the_line_is_printed_once_when_a_run_starts(tmp_path, tiny_model, capsys):
    (tmp_path / "train.jsonl").write_text("\n".join(ROWS) + "\n")
    config = config_from_yaml(tmp_path, base_model=str(tiny_model), plugins=[LIGER], liger_rms_norm=False,
                              sequence_len=64, micro_batch_size=2, max_steps=1, save_strategy="no",
                              dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out"))
    run(config)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("kernel keys:")]
    assert lines == ["kernel keys: plugins LigerPlugin: served by puretune's kernels through their keys; "
                     "liger_rms_norm: false: the plain-torch reference pure.models.llama.rms_norm"]


# --- true keeps our kernel, false selects the reference ---------------------------------------------


@pytest.mark.parametrize("key", [k for k, op in KEY_OPS.items() if op is not None])
def test_false_selects_the_reference_of_the_op_and_true_keeps_the_kernel(tmp_path, key):
    op = KEY_OPS[key]
    others = {k: False for k, o in KEY_OPS.items() if o == op}  # keys of one op are set alike
    off, _ = line_for(tmp_path, **others)
    on, _ = line_for(tmp_path, **{k: True for k in others})
    assert off[op] is reference_model_ops()[op]
    assert same(on[op], select_model_ops(CPU, F32)[op])
    assert all(same(off[name], on[name]) for name in off if name != op)  # the other ops are untouched


def test_the_selected_kernels_on_cpu_are_not_the_references():
    """Otherwise the test above could not tell true from false."""
    chosen, references = select_model_ops(CPU, F32), reference_model_ops()
    assert not any(same(chosen[name], references[name]) for name in chosen)


# --- the served ops compute the reference's values --------------------------------------------------


def test_served_ops_equal_the_references_in_float32(tmp_path):
    ops, _ = line_for(tmp_path, plugins=[LIGER, CCE], liger_rms_norm=True, liger_glu_activation=True,
                      lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True, fused_attn_kernel=True)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 7, 16, generator=gen), torch.randn(16, generator=gen)
    # 1e-5: float32 rounding of a 16-wide mean of squares and its rsqrt, ~10 ulp
    torch.testing.assert_close(ops["rms_norm_fn"](x, w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    gate, up = torch.randn(3, 24, generator=gen), torch.randn(3, 24, generator=gen)
    torch.testing.assert_close(ops["swiglu_fn"](gate, up), swiglu(gate, up), rtol=1e-5, atol=1e-5)
    weight, entry = torch.randn(12, 16, generator=gen), {"A": torch.randn(4, 16, generator=gen),
                                                        "B": torch.randn(12, 4, generator=gen)}
    lora_config = LoraConfig(r=4, alpha=8)
    torch.testing.assert_close(ops["lora_linear_fn"](x, weight, None, entry, lora_config),
                               lora_linear(x, weight, None, entry, lora_config), rtol=1e-5, atol=1e-5)
    hidden, head = torch.randn(9, 16, generator=gen), torch.randn(40, 16, generator=gen)
    targets = torch.tensor([1, 5, -100, 39, 0, 7, 7, 2, 30])
    torch.testing.assert_close(ops["token_logprob_fn"](hidden, head, targets).logprobs,
                               reference_token_logprobs(hidden, head, targets).logprobs, rtol=1e-5, atol=1e-5)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen),
               torch.randn(1, 2, 6, 8, generator=gen))
    segments = torch.tensor([[1, 1, 1, 2, 2, 2]])  # two packed documents
    from pure.models.llama import attention_mask

    mask = attention_mask(segments, segments, 0, None)
    # the per-document kernel reads the documents from the segment ids, the reference from the mask
    torch.testing.assert_close(ops["attention_fn"](q, k, v, None, False, segments),
                               sdpa_attention(q, k, v, mask, False, segments), rtol=1e-5, atol=1e-5)


# --- what cannot be served is refused with one line -------------------------------------------------


@pytest.mark.parametrize("plugin", ["my_pkg.MyPlugin", "axolotl.integrations.lm_eval.LMEvalPlugin",
                                    "axolotl.integrations.spectrum.SpectrumPlugin",
                                    "axolotl.integrations.grokfast.GrokfastPlugin"])
def test_a_plugin_we_do_not_serve_is_refused_by_name(tmp_path, plugin):
    with pytest.raises(ConfigError, match=rf"^plugins: {plugin} is not supported yet by puretune; it runs no "
                                          "plugin code and serves only the kernel plugins LigerPlugin, "
                                          "CutCrossEntropyPlugin, KernelsPlugin"):
        config_from_yaml(tmp_path, plugins=[LIGER, plugin])
    with pytest.raises(ConfigError, match=rf"^plugins: {plugin} is not supported yet"):  # not its own keys first
        config_from_yaml(tmp_path, plugins=[plugin], grokfast_alpha=2.0)


def test_keys_of_one_op_that_disagree_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="lora_mlp_kernel: true, lora_qkv_kernel: false: one LoRA linear"):
        config_from_yaml(tmp_path, lora_mlp_kernel=True, lora_qkv_kernel=False)
    with pytest.raises(ConfigError, match=r"liger_cross_entropy: false, cut_cross_entropy: true \(from plugins\)"):
        config_from_yaml(tmp_path, plugins=[CCE], liger_cross_entropy=False)


def test_lora_kernels_need_an_adapter_and_embedding_lora_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="lora_o_kernel: true applies to LoRA projections; this config has no adapter"):
        config_from_yaml(tmp_path, adapter=None, lora_target_linear=None, lora_o_kernel=True)
    with pytest.raises(ConfigError, match="lora_embedding_kernel is not supported yet by puretune .*embed_tokens"):
        config_from_yaml(tmp_path, lora_embedding_kernel=True)
    with pytest.raises(ConfigError, match="use_scattermoe is not supported yet by puretune .*no MoE layers"):
        config_from_yaml(tmp_path, plugins=[KERNELS], use_scattermoe=True)


def test_the_axolotl_lora_kernels_example_validates_with_its_kernel_keys():
    raw = yaml.safe_load(Path("/work/shared/compat/axolotl-examples/llama-3--lora-1b-kernels.yml").read_text())
    raw.update(base_model="smollm2-135m-instruct", optimizer="adamw_torch")  # its adamw_8bit is refused, by name
    config = validate(raw)
    assert (config.lora_mlp_kernel, config.lora_qkv_kernel, config.lora_o_kernel) == (True, True, True)
    ops, line = served_ops(config, CPU, F32)
    assert same(ops["lora_linear_fn"], select_model_ops(CPU, F32)["lora_linear_fn"])
    assert "lora_qkv_kernel: served by kernels.lora_linear (" in line
