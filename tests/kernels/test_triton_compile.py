"""The Triton kernels compile for a Hopper GPU (sm_90) without one: Triton's own compiler and the
ptxas it ships run on CPU. The interpreter tests check the arithmetic; this checks what only the
compiler sees (constexpr branches, types, loop bounds) and that the fused LoRA matmul becomes a
software-pipelined tensor-core (wgmma) loop once Triton specialises strides of 1 and sizes
divisible by 16, as it does at launch. Skipped without triton.
"""
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import lora_linear, rmsnorm, swiglu  # noqa: E402

if "constexprs" not in inspect.signature(ASTSource).parameters:  # triton < 3.3 names them otherwise
    pytest.skip("this triton's ASTSource takes no constexprs (triton < 3.3)", allow_module_level=True)
from kernels.triton_jit import kernel_for  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(fn, pointer_dtype, constants, floats=(), num_warps=4, num_stages=3):
    """Compile `fn` as Triton would at launch with every pointer 16-byte aligned, every other
    integer divisible by 16 and the arguments in `constants` (constexprs and unit strides) fixed."""
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn).parameters):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("rstd_ptr", "dw_partial_ptr") else pointer_dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel_for(fn, torch.device("cuda")), signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.mark.parametrize("pointer_dtype", ["*bf16", "*fp32"])
def test_rms_norm_and_swiglu_kernels_compile(pointer_dtype):
    for width in (576, 2048, 8192):  # SmolLM2, Llama-3.2-1B, 70B-sized rows
        block = 1 << (width - 1).bit_length()
        warps = rmsnorm._num_warps(block)
        compile_for_hopper(rmsnorm._rms_norm_forward_kernel, pointer_dtype, {"BLOCK": block}, floats=("eps",),
                           num_warps=warps)
        compile_for_hopper(rmsnorm._rms_norm_backward_kernel, pointer_dtype, {"BLOCK": block}, num_warps=warps)
    compile_for_hopper(swiglu._swiglu_forward_kernel, pointer_dtype, {"BLOCK": swiglu._BLOCK})
    compile_for_hopper(swiglu._swiglu_backward_kernel, pointer_dtype, {"BLOCK": swiglu._BLOCK})


FORWARD_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_pk", "stride_cr", "stride_zr", "stride_on")  # W^T, A^T, B^T views
BACKWARD_UNIT_STRIDES = ("stride_xk", "stride_wn", "stride_pr", "stride_cn", "stride_zr", "stride_on")  # W, B, A
HOPPER_SHARED_MEMORY = 227 * 1024  # what one H100 / H200 block may use


def compile_lora_matmul(config, pointer_dtype, unit_strides=FORWARD_UNIT_STRIDES, *, has_bias, precision="ieee"):
    """The fused LoRA matmul (x w + s (x p) c) compiled with one launch config of `lora_linear`."""
    constants = {name: 1 for name in unit_strides}
    constants.update({k: v for k, v in config.items() if k.startswith("BLOCK")})
    constants.update(LOW_RANK=1, HAS_BIAS=has_bias, UPCAST=False, PRECISION=precision, BLOCK_R=16, GROUP_M=8)
    return compile_for_hopper(lora_linear._matmul_lowrank_kernel, pointer_dtype, constants, floats=("scale",),
                              num_warps=config["num_warps"], num_stages=config["num_stages"])


@pytest.mark.parametrize("direction,unit_strides", [("forward", FORWARD_UNIT_STRIDES),
                                                    ("backward", BACKWARD_UNIT_STRIDES)])
def test_fused_lora_matmul_compiles_to_a_pipelined_tensor_core_loop(direction, unit_strides):
    kernel = compile_lora_matmul(lora_linear._CUDA_CONFIGS[0], "*bf16", unit_strides, has_bias=direction == "forward")
    ttgir = kernel.asm["ttgir"]
    assert "warp_group_dot" in ttgir and "async_copy" in ttgir
    # 3 stages of a 128x64 x tile and a 64x128 w tile in bf16 (96 KiB) plus the low-rank tiles
    assert kernel.metadata.shared > 96 * 1024


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_lora_matmul_compiles_for_float32_with_the_fixed_tile(precision):
    # float32 takes one fixed tile (no autotuning) and IEEE products unless TF32 is allowed
    kernel = compile_lora_matmul(lora_linear._CUDA_FP32_CONFIG, "*fp32", has_bias=False, precision=precision)
    assert kernel.metadata.shared <= HOPPER_SHARED_MEMORY


@pytest.mark.parametrize("config", lora_linear._CUDA_CONFIGS, ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}")
def test_every_autotune_config_fits_in_hopper_shared_memory(config):
    # a config over the limit would only ever be skipped by the autotuner at run time
    kernel = compile_lora_matmul(config, "*bf16", has_bias=True)
    assert kernel.metadata.shared <= HOPPER_SHARED_MEMORY
