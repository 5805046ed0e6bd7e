"""kernels/bnb_optim.py: AdamW with 8-bit state tracks fp32 AdamW (bitsandbytes, CUDA only)."""
import pytest
import torch

from kernels.bnb_optim import adamw_8bit
from pure.optim import adamw, apply_updates
from tests.pure.test_optim import make_grads, make_params


def test_adamw_8bit_without_bitsandbytes_names_the_package():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):
            adamw_8bit(1e-3)
    else:
        pytest.skip("bitsandbytes is installed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-bit kernels need CUDA")
def test_adamw_8bit_tracks_fp32_adamw_on_cuda():
    pytest.importorskip("bitsandbytes")
    shapes = {"big.weight": (128, 64), "small.weight": (8, 8)}
    params = {n: p.cuda() for n, p in make_params(shapes=shapes).items()}
    opt8 = adamw_8bit(1e-3, weight_decay=0.01)
    opt32 = adamw(1e-3, weight_decay=0.01)
    s8, s32, p8, p32 = opt8.init(params), opt32.init(params), params, params
    for step in range(5):
        g = {n: t.cuda() for n, t in make_grads(params, step).items()}
        u8, s8 = opt8.update(g, s8, p8, step)
        u32, s32 = opt32.update(g, s32, p32, step)
        p8, p32 = apply_updates(p8, u8), apply_updates(p32, u32)
    torch.testing.assert_close(p8["small.weight"], p32["small.weight"], atol=1e-6, rtol=0)
    assert float((p8["big.weight"] - p32["big.weight"]).abs().max()) < 5e-4
