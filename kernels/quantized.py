"""Frozen base weights in bitsandbytes' quantised formats, and the linear layers that read them.

QLoRA (Dettmers et al. 2023) and LLM.int8 (Dettmers et al. 2022) keep the frozen base in 4 or 8 bits
and train a LoRA delta on top in the compute dtype. Here the quantised weight is a `QuantizedWeight`
leaf in the params pytree, in the place of the dense `...weight` tensor. It is not a tensor, so it is
never differentiated; `pure.tree` treats it as a leaf, so `remat` hands it through unchanged.

- 4-bit (`quantize_4bit`): NF4 or FP4 codes, two per byte, with one absmax per block of 64 (and with
  double quantisation the absmaxes themselves in 8 bits, blocks of 256), by `bitsandbytes.functional
  .quantize_4bit`: exactly the data transformers' `BitsAndBytesConfig(load_in_4bit=True)` stores.
- 8-bit (`quantize_int8`): LLM.int8's weight format, int8 rows with one absmax per row
  (`int8_vectorwise_quant`), as `Linear8bitLt` stores it.

The linear (`quantized_linear`) dequantises the weight with bitsandbytes' kernel (its CPU backend here,
CUDA on a GPU) into the activations' dtype and multiplies, in an autograd.Function that keeps only the
quantised weight: the backward dequantises again for dx = dy W, so no dense copy of a frozen weight
outlives its layer. (The 8-bit path multiplies by the dequantised weight too: weight-only int8, the
activations stay in the compute dtype. bitsandbytes' own LLM.int8 matmul also rounds the activations
to int8, with fp16 outlier columns; that is less exact and is not differentiable under `torch.func`.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

BLOCKSIZE_4BIT = 64  # transformers' and axolotl's default


class _HubKernelProbe(logging.Filter):
    """bitsandbytes' CPU backend tries `kernels.get_kernel` (the Hugging Face hub package) at import
    and finds this package of the same name; it then falls back to its own kernels and logs a warning
    that is not about anything the user did. This filter drops that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def bnb():
    """`bitsandbytes.functional`, or ImportError with the install line."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelProbe())
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("quantised bases need the 'bitsandbytes' package (pip install 'bitsandbytes>=0.50')") from exc
    return bnbf


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A frozen [out, in] weight in a bitsandbytes format.

    kind: "nf4", "fp4" or "int8". data: the packed 4-bit codes (uint8 [out*in/2, 1]) or the int8
    rows [out, in]. state: bitsandbytes' `QuantState` (4-bit: absmax, code book, blocksize, nested
    state) or the per-row absmax [out] (int8). shape, dtype: the dense weight's shape and the dtype
    it was quantised from. compute_dtype: the dtype the product runs in (transformers'
    `bnb_4bit_compute_dtype`); None runs it in the activations' dtype."""

    kind: str
    data: torch.Tensor
    state: Any
    shape: tuple[int, int]
    dtype: torch.dtype
    compute_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def ndim(self) -> int:
        return 2

    def nbytes(self) -> int:
        """Bytes held: the codes and every tensor of the quantisation state."""
        tensors = [self.data] + _state_tensors(self.state)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> "QuantizedWeight":
        state = self.state.to(device) if self.kind == "int8" else _moved_state(self.state, device)
        return QuantizedWeight(self.kind, self.data.to(device), state, self.shape, self.dtype, self.compute_dtype)


def _state_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def _moved_state(state, device):
    import copy

    moved = copy.deepcopy(state)
    moved.to(device)
    return moved


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False,
                  blocksize: int = BLOCKSIZE_4BIT, compute_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """`weight` [out, in] as 4-bit codes with blockwise absmax scales (QLoRA's NF4, or FP4)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    data, state = bnb().quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                      quant_type=quant_type)
    return QuantizedWeight(quant_type, data, state, tuple(weight.shape), weight.dtype, compute_dtype)


def quantize_int8(weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """`weight` [out, in] as int8 rows scaled by each row's absmax / 127 (LLM.int8's weight format)."""
    codes, row_absmax, _ = bnb().int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return QuantizedWeight("int8", codes, row_absmax, tuple(weight.shape), weight.dtype, compute_dtype)


def dequantize(weight: QuantizedWeight | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight, by bitsandbytes' dequantisation kernel, in `dtype` (default: the dtype it was
    quantised from). A plain tensor comes back as it is (cast to `dtype` when given)."""
    if isinstance(weight, torch.Tensor):
        return weight if dtype is None else weight.to(dtype)
    dtype = dtype or weight.dtype
    if weight.kind == "int8":
        return bnb().int8_vectorwise_dequant(weight.data, weight.state).to(dtype)
    return bnb().dequantize_4bit(weight.data, weight.state).to(dtype)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantised in the forward and again in the backward (only the quantised
    weight is kept). The weight gets no gradient: it is frozen."""

    @staticmethod
    def forward(x, weight: QuantizedWeight):
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize(ctx.weight, dy.dtype), None


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """F.linear for a quantised or a dense weight: y = x W^T + b."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    out_dtype = x.dtype
    if weight.compute_dtype is not None:  # transformers' Linear4bit: the product in the compute dtype
        x = x.to(weight.compute_dtype)
    elif torch.is_autocast_enabled(x.device.type):  # the autocast dtype, as F.linear would use
        x = x.to(torch.get_autocast_dtype(x.device.type))
        out_dtype = x.dtype
    y = _QuantizedMatmul.apply(x, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def quantized_lora_linear(x, weight, bias, entry, config, key=None):
    """`pure.lora.lora_linear` over a quantised base: the base product by `quantized_linear`, the
    low-rank path (and DoRA's norm, on the dequantised weight) as in the reference."""
    from pure.lora import lora_linear

    return lora_linear(x, weight, bias, entry, config, key, linear=quantized_linear, dense=dequantize)


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class QuantizationSpec:
    """What to quantise and how. bits: 4 or 8. quant_type: "nf4" / "fp4" (4-bit). double_quant:
    quantise the 4-bit absmaxes too. skip: module names kept dense (besides lm_head and embeddings,
    which are never quantised, as transformers does)."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"quantisation bits must be 4 or 8, got {self.bits}")

    def describe(self) -> str:
        if self.bits == 8:
            return "int8 (LLM.int8 weight format, per-row absmax)"
        return f"{self.quant_type} 4-bit, blocks of {BLOCKSIZE_4BIT}" + (", double-quantised absmax" if self.double_quant else "")


def quantizable(name: str, tensor: torch.Tensor, skip: tuple[str, ...] = ()) -> bool:
    """The decoder's linear weights: 2-D `...weight` tensors other than embeddings, lm_head and `skip`."""
    if not name.endswith(".weight") or not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        return False
    module = name[: -len(".weight")]
    if module == "lm_head" or module.endswith("embed_tokens"):
        return False
    return not any(module == s or module.endswith("." + s) for s in skip)


def quantize_params(params: Mapping[str, torch.Tensor], spec: QuantizationSpec) -> dict:
    """Params with every quantisable linear weight replaced by its `QuantizedWeight`.

    The tensors kept dense are copied: params loaded from safetensors are views into one memory map
    of the file, and a single view left alive keeps every page of it resident, the fp32 weights that
    were just quantised included (measured on SmolLM2-135M: 1.0 GB resident after quantising without
    the copy, the fp32 file's pages never released)."""
    out = {}
    for name, tensor in params.items():
        if quantizable(name, tensor, spec.skip):
            out[name] = quantize_int8(tensor, spec.compute_dtype) if spec.bits == 8 else \
                quantize_4bit(tensor, spec.quant_type, spec.double_quant, compute_dtype=spec.compute_dtype)
        else:
            out[name] = tensor.clone()
    return out


def is_quantized(params: Mapping[str, Any]) -> bool:
    return any(isinstance(v, QuantizedWeight) for v in params.values())


def dequantize_params(params: Mapping[str, Any], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every `QuantizedWeight` as its dense tensor in `dtype` (default: the dtype it was quantised
    from); other params unchanged."""
    return {k: dequantize(v, dtype) if isinstance(v, QuantizedWeight) else v for k, v in params.items()}


def params_nbytes(params: Mapping[str, Any]) -> int:
    """Bytes the params hold, quantised weights counted with their state."""
    return sum(v.nbytes() if isinstance(v, QuantizedWeight) else v.numel() * v.element_size() for v in params.values())
