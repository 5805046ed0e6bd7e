"""kernels/ao_optim.py: torchao's low-bit AdamW steps like its torchao.optim class, with its state
as plain tensors in the pytree."""
import pytest
import torch

from kernels.ao_optim import KINDS, torchao_adamw
from pure.optim import apply_updates
from tests.pure.test_optim import make_grads, make_params

ao = pytest.importorskip("torchao.optim")

# one tensor torchao quantises (>= 4096 values, a multiple of the block), one it keeps plain
SHAPES = {"big.weight": (64, 128), "small.weight": (8, 8)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_torchao_adamw_steps_like_its_torchao_class(kind, monkeypatch):
    params = make_params(shapes=SHAPES)
    lr, wd = 1e-2, 0.1
    opt = torchao_adamw(kind, lr, weight_decay=wd)
    state, ours = opt.init(params), params
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    ref = getattr(ao, KINDS[kind][0])(list(torch_params.values()), lr=lr, weight_decay=wd)
    # the class compiles torchao's single_param_adam; run it eagerly, as the wrapper does (the same
    # function: compiling it on CPU takes ~30 s)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    for step in range(3):
        grads = make_grads(params, step)
        for n, p in torch_params.items():
            p.grad = grads[n].clone()
        ref.step()
        updates, state = opt.update(grads, state, ours, step)
        ours = apply_updates(ours, updates)
        for n in params:
            # new_p - p added back to p: exact but where |update| is over half |p| (one rounding)
            torch.testing.assert_close(ours[n], torch_params[n].detach(), atol=1e-6, rtol=0)
    big = state["params"]["big.weight"]["exp_avg"]
    theirs = ref.state[torch_params["big.weight"]]["exp_avg"]
    assert set(big) == set(theirs.__tensor_flatten__()[0]) and all(type(t) is torch.Tensor for t in big.values())
    assert set(state["params"]["small.weight"]["exp_avg"]) == {"value"}
    torch.testing.assert_close(theirs.dequantize(), type(theirs).__tensor_unflatten__(
        big, theirs.__tensor_flatten__()[1], None, None).dequantize(), atol=1e-6, rtol=0)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind 'int2'"):
        torchao_adamw("int2", 1e-3)
