"""kernels/bnb_optim.py: each bitsandbytes optimizer steps like its `bnb.optim` class, over a state
pytree that round-trips exactly."""
import pytest
import torch

from kernels.bnb_optim import adamw_8bit, ademamix_schedules, bnb_optimizer
from pure.optim import adamw, apply_updates
from tests.pure.test_optim import make_grads, make_params

bnb = pytest.importorskip("bitsandbytes")

# one tensor big enough for 8-bit state (>= 4096 values, a partial last block), one small (32-bit state)
SHAPES = {"big.weight": (72, 60), "small.weight": (8, 8)}

# (kernel, bits, our options) -> the bnb.optim class with the same settings
CASES = {
    "adamw8": (("adam", 8, {}), lambda ps, lr, wd: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=wd)),
    "paged_adamw8": (("adam", 8, {}), lambda ps, lr, wd: bnb.optim.PagedAdamW8bit(ps, lr=lr, weight_decay=wd)),
    "paged_adamw32": (("adam", 32, {}), lambda ps, lr, wd: bnb.optim.PagedAdamW32bit(ps, lr=lr, weight_decay=wd)),
    "lion8": (("lion", 8, {"b2": 0.99}), lambda ps, lr, wd: bnb.optim.Lion8bit(ps, lr=lr, weight_decay=wd)),
    "paged_lion8": (("lion", 8, {"b2": 0.99}), lambda ps, lr, wd: bnb.optim.PagedLion8bit(ps, lr=lr, weight_decay=wd)),
    "rmsprop32": (("rmsprop", 32, {"b1": 0.99, "b2": 0.0}),
                  lambda ps, lr, wd: bnb.optim.RMSprop32bit(ps, lr=lr, weight_decay=wd)),
    "rmsprop8": (("rmsprop", 8, {"b1": 0.99, "b2": 0.0}),
                 lambda ps, lr, wd: bnb.optim.RMSprop8bit(ps, lr=lr, weight_decay=wd)),
    "ademamix32": (("ademamix", 32, {"b3": 0.9999, "alpha": 5.0}),
                   lambda ps, lr, wd: bnb.optim.AdEMAMix(ps, lr=lr, weight_decay=wd)),
    "ademamix8": (("ademamix", 8, {"b3": 0.9999, "alpha": 5.0}),
                  lambda ps, lr, wd: bnb.optim.AdEMAMix8bit(ps, lr=lr, weight_decay=wd)),
    "paged_ademamix8_scheduled": (("ademamix", 8, {"b3": 0.9999, "alpha": 5.0, "t_alpha": 3, "t_beta3": 3}),
                                  lambda ps, lr, wd: bnb.optim.PagedAdEMAMix8bit(ps, lr=lr, weight_decay=wd,
                                                                                 t_alpha=3, t_beta3=3)),
}


def bnb_history(make, params, lr, wd, steps):
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = make(list(torch_params.values()), lr, wd)
    history = []
    for step in range(steps):
        grads = make_grads(params, step)
        for n, p in torch_params.items():
            p.grad = grads[n].clone()
        opt.step()
        history.append({n: p.detach().clone() for n, p in torch_params.items()})
    return history, {n: opt.state[p] for n, p in torch_params.items()}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_bnb_optimizer_steps_like_its_bnb_class(case):
    (kernel, bits, options), make = CASES[case]
    params = make_params(shapes=SHAPES)
    lr, wd = 1e-2, 0.1
    opt = bnb_optimizer(kernel, lr, bits=bits, weight_decay=wd, **options)
    state, ours = opt.init(params), params
    theirs, their_state = bnb_history(make, params, lr, wd, 4)
    for step in range(4):
        updates, state = opt.update(make_grads(params, step), state, ours, step)
        ours = apply_updates(ours, updates)
        for n in params:
            # we return new_p - p and the step adds it back: exact whenever p and new_p are within a
            # factor 2 of each other (Sterbenz), otherwise one rounding of p's magnitude
            torch.testing.assert_close(ours[n], theirs[step][n], atol=1e-6, rtol=0)
    for n in params:  # the state is bnb's; it sees the params (coupled decay) one rounding apart at most
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key not in their_state[n]:
                continue
            mine, ref = state["params"][n][key], their_state[n][key]
            assert mine.shape == ref.shape and mine.dtype == ref.dtype, (n, key)
            if mine.dtype == torch.uint8:  # a code may sit one step over when its value is on a boundary
                diff = (mine.int() - ref.int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, (n, key)
            else:
                torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    assert (state["params"]["big.weight"]["state1"].dtype == torch.uint8) == (bits == 8)
    assert state["params"]["small.weight"]["state1"].dtype == torch.float32


def test_bnb_optimizer_is_pure():
    params = make_params(shapes=SHAPES)
    opt = bnb_optimizer("adam", 1e-2, bits=8, weight_decay=0.1)
    state = opt.init(params)
    grads = make_grads(params, 0)
    before = {k: v.clone() for k, v in params.items()}
    u1, s1 = opt.update(grads, state, params, 0)
    u2, s2 = opt.update(grads, state, params, 0)  # same inputs, same outputs: nothing was written into
    for n in params:
        assert torch.equal(params[n], before[n]) and torch.equal(u1[n], u2[n])
    assert int(state["count"]) == 0 and torch.equal(s1["params"]["big.weight"]["state1"],
                                                    s2["params"]["big.weight"]["state1"])


def test_adamw_8bit_tracks_fp32_adamw():
    """8-bit moments stay close to fp32 AdamW: the small tensor (fp32 state) to float rounding, the
    big one to the quantisation error of 5 steps."""
    params = make_params(shapes={"big.weight": (128, 64), "small.weight": (8, 8)})
    opt8, opt32 = adamw_8bit(1e-3, weight_decay=0.01), adamw(1e-3, weight_decay=0.01)
    s8, s32, p8, p32 = opt8.init(params), opt32.init(params), params, params
    for step in range(5):
        g = make_grads(params, step)
        u8, s8 = opt8.update(g, s8, p8, step)
        u32, s32 = opt32.update(g, s32, p32, step)
        p8, p32 = apply_updates(p8, u8), apply_updates(p32, u32)
    torch.testing.assert_close(p8["small.weight"], p32["small.weight"], atol=1e-6, rtol=0)
    assert float((p8["big.weight"] - p32["big.weight"]).abs().max()) < 5e-4


def test_ademamix_schedules_warm_alpha_and_beta3_up():
    assert ademamix_schedules(1, 5.0, 0.9, 0.9999, 4, None) == (1.25, 0.9999)
    alpha, b3 = ademamix_schedules(1, 5.0, 0.9, 0.9999, None, 100)
    assert alpha == 5.0 and 0.9 < b3 < 0.9999
    assert ademamix_schedules(100, 5.0, 0.9, 0.9999, 4, 100) == pytest.approx((5.0, 0.9999))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'adagrad'"):
        bnb_optimizer("adagrad", 1e-3)
