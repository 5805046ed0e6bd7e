"""Specification of pure/optim/: each optimizer steps like its reference."""

import math

import pytest
import torch

from pure import optim, tree
from pure.optim import (
    ParamGroup,
    apply_updates,
    chain,
    clip_by_global_norm,
    default_decay_mask,
    global_norm,
    grad_norm_from_state,
    make_param_groups,
    param_group_lr_scales,
)

SHAPES = {
    "model.embed_tokens.weight": (11, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.q_proj.bias": (4,),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.0.input_layernorm.weight": (4,),
    "model.norm.weight": (4,),
    "lm_head.weight": (11, 4),
}


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=dtype) for name, shape in shapes.items()}


def make_grads(params, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}


def run_pure(opt, params, steps):
    state = opt.init(params)
    history = []
    for step in range(steps):
        updates, state = opt.update(make_grads(params, step), state, params, step)
        params = apply_updates(params, updates)
        history.append(params)
    return history, state


def run_torch(make_optimizer, params, steps, lr_at=None, groups=None):
    torch_params = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    if groups is None:
        opt = make_optimizer(list(torch_params.values()))
    else:
        opt = make_optimizer([{**g, "params": [torch_params[n] for n in g["params"]]} for g in groups])
    base_lrs = [g["lr"] for g in opt.param_groups]
    history = []
    for step in range(steps):
        grads = make_grads(params, step)
        for name, p in torch_params.items():
            p.grad = grads[name].clone()
        if lr_at is not None:
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * lr_at(step)
        opt.step()
        history.append({name: p.detach().clone() for name, p in torch_params.items()})
    return history


def assert_trees_close(a, b, atol, rtol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def by_path(state):
    """A tree (an optimizer state) as ``{dotted path: tensor}``, the form a checkpoint saves it in."""
    return dict(tree.leaves_with_paths(state))


def warmup_decay(step):
    return min(1.0, (step + 1) / 3) * (1.0 - 0.1 * step)


# --------------------------------------------------------------------------- torch.optim parity


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("scheduled", [False, True])
def test_adamw_matches_torch_adamw(weight_decay, scheduled):
    params = make_params()
    lr = 1e-2
    schedule = (lambda s: lr * warmup_decay(s)) if scheduled else lr
    ours, _ = run_pure(optim.adamw(schedule, 0.9, 0.95, 1e-8, weight_decay), params, 5)
    ref = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False),
        params, 5, lr_at=warmup_decay if scheduled else None,
    )
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, atol=1e-6)


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01), (0.5, False, 0.1)])
def test_sgd_matches_torch_sgd(momentum, nesterov, weight_decay):
    params = make_params()
    ours, _ = run_pure(optim.sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), params, 5)
    ref = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
        params, 5,
    )
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, atol=1e-6)


# --------------------------------------------------------------------------- papers, float64


def test_lion_matches_hand_computed_update_float64():
    params = make_params(torch.float64)
    lr, b1, b2, wd = 3e-3, 0.9, 0.99, 0.1
    schedule = lambda s: lr * warmup_decay(s)  # noqa: E731
    ours, _ = run_pure(optim.lion(schedule, b1, b2, wd), params, 5)
    p = {n: t.clone() for n, t in params.items()}
    m = {n: torch.zeros_like(t) for n, t in params.items()}
    for step in range(5):
        g = make_grads(params, step)
        for n in p:
            c = b1 * m[n] + (1 - b1) * g[n]
            p[n] = p[n] * (1 - schedule(step) * wd) - schedule(step) * torch.sign(c)
            m[n] = b2 * m[n] + (1 - b2) * g[n]
        assert_trees_close(ours[step], p, atol=1e-10)


def _adafactor_reference(params, steps, lr, wd, beta1=None, eps1=1e-30, clip=1.0, decay_rate=-0.8):
    """Adafactor written from the paper's Algorithms 4/5 + HF's update clipping, element-wise where possible."""
    p = {n: t.clone() for n, t in params.items()}
    R, C, V, M = {}, {}, {}, {}
    history = []
    for step in range(steps):
        t = step + 1
        beta2t = 1 - t**decay_rate
        g = make_grads(params, step)
        for n in p:
            G = g[n] ** 2 + eps1
            if g[n].ndim >= 2:
                rows, cols = G.shape
                R[n] = beta2t * R.get(n, torch.zeros(rows, dtype=G.dtype)) + (1 - beta2t) * G.sum(1) / cols
                C[n] = beta2t * C.get(n, torch.zeros(cols, dtype=G.dtype)) + (1 - beta2t) * G.sum(0) / rows
                Vhat = torch.outer(R[n], C[n]) / (R[n].sum() / rows)
            else:
                Vhat = V[n] = beta2t * V.get(n, torch.zeros_like(G)) + (1 - beta2t) * G
            U = g[n] / torch.sqrt(Vhat)
            rms = math.sqrt(float((U**2).sum()) / U.numel())
            U = U / max(1.0, rms / clip)
            step_update = lr * U
            if beta1 is not None:
                M[n] = beta1 * M.get(n, torch.zeros_like(U)) + (1 - beta1) * step_update
                step_update = M[n]
            p[n] = p[n] - wd * lr * p[n] - step_update
        history.append({n: t.clone() for n, t in p.items()})
    return history


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_matches_hand_computed_update_float64(beta1):
    params = make_params(torch.float64)
    ours, _ = run_pure(optim.adafactor(1e-2, beta1=beta1, weight_decay=0.01), params, 5)
    ref = _adafactor_reference(params, 5, 1e-2, 0.01, beta1=beta1)
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, atol=1e-10)


def test_adafactor_matches_transformers_adafactor():
    from transformers.optimization import Adafactor

    params = make_params()
    ours, _ = run_pure(optim.adafactor(1e-2), params, 5)
    ref = run_torch(lambda ps: Adafactor(ps, lr=1e-2, scale_parameter=False, relative_step=False), params, 5)
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, atol=1e-6)


# --------------------------------------------------------------------------- clipping, masks, groups


def test_clip_records_preclip_norm_and_clips_to_max_norm():
    params = make_params()
    grads = {n: 10.0 * g for n, g in make_grads(params, 0).items()}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    clip = clip_by_global_norm(1.0)
    clipped, state = clip.update(grads, clip.init(params), params, 0)
    assert float(grad_norm_from_state(state)) == pytest.approx(norm, rel=1e-6)
    assert float(global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    small = {n: 1e-3 * g for n, g in grads.items()}
    unclipped, state = clip.update(small, state, params, 1)
    assert_trees_close(unclipped, small, atol=0.0)
    assert float(grad_norm_from_state(state)) == pytest.approx(1e-3 * norm, rel=1e-6)


def test_default_decay_mask_skips_biases_norms_and_vectors():
    assert default_decay_mask("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 4))
    assert default_decay_mask("model.layers.0.self_attn.q_proj.B", torch.zeros(4, 2))
    assert not default_decay_mask("model.layers.0.self_attn.q_proj.bias", torch.zeros(4, 4))
    assert not default_decay_mask("model.layers.0.post_attention_layernorm.weight")
    assert not default_decay_mask("model.layers.0.self_attn.q_norm.weight")
    assert not default_decay_mask("model.some.scale", torch.zeros(4))


def test_decay_mask_excludes_masked_params_from_decay():
    params = make_params()
    zero = {n: torch.zeros_like(p) for n, p in params.items()}
    opt = optim.adamw(0.1, weight_decay=0.5, decay_mask=default_decay_mask)
    updates, _ = opt.update(zero, opt.init(params), params, 0)
    for n, p in params.items():
        expected = -0.1 * 0.5 * p if default_decay_mask(n, p) else torch.zeros_like(p)
        torch.testing.assert_close(updates[n], expected, atol=1e-7, rtol=0)


LORA_SHAPES = {
    "model.embed_tokens.A": (2, 11),
    "model.embed_tokens.B": (4, 2),
    "model.layers.0.self_attn.q_proj.A": (2, 4),
    "model.layers.0.self_attn.q_proj.B": (4, 2),
    "model.layers.0.self_attn.o_proj.A": (2, 4),
    "model.layers.0.self_attn.o_proj.B": (4, 2),
    "model.layers.0.self_attn.o_proj.m": (4,),
}


def sgd_updates(groups, params, lr):
    opt = optim.sgd(lr, lr_scales=param_group_lr_scales(groups))
    grads = make_grads(params, 0)
    updates, _ = opt.update(grads, opt.init(params), params, 0)
    return {n: float((updates[n] / -grads[n]).mean()) for n in params}


def test_loraplus_scales_b_matrices_and_embedding_adapters():
    params = make_params(shapes=LORA_SHAPES)
    lr = 1e-3
    eff = sgd_updates(make_param_groups(lr, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-6), params, lr)
    assert eff["model.layers.0.self_attn.q_proj.A"] == pytest.approx(lr)
    assert eff["model.layers.0.self_attn.q_proj.B"] == pytest.approx(16 * lr)
    assert eff["model.layers.0.self_attn.o_proj.B"] == pytest.approx(16 * lr)
    assert eff["model.layers.0.self_attn.o_proj.m"] == pytest.approx(16 * lr)  # DoRA magnitude, as PEFT
    assert eff["model.embed_tokens.A"] == pytest.approx(1e-6)
    assert eff["model.embed_tokens.B"] == pytest.approx(1e-6)


def test_lr_groups_and_embedding_lr_set_group_learning_rates():
    params = make_params()
    lr = 2e-5
    groups = make_param_groups(
        lr, lr_groups=[{"name": "up", "modules": ["mlp.up_proj.weight"], "lr": 1e-6}], embedding_lr_scale=0.5
    )
    eff = sgd_updates(groups, params, lr)
    assert eff["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1e-6)
    assert eff["model.embed_tokens.weight"] == pytest.approx(1e-5)
    assert eff["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(lr)
    eff = sgd_updates(make_param_groups(lr, embedding_lr=3e-4), params, lr)
    assert eff["model.embed_tokens.weight"] == pytest.approx(3e-4)


def test_group_lr_follows_the_schedule_multiplicatively():
    params = make_params()
    groups = [ParamGroup("q", lambda path, p: "q_proj" in path, lr_scale=4.0)]
    opt = optim.sgd(lambda step: 0.1 / (step + 1), lr_scales=param_group_lr_scales(groups))
    grads = make_grads(params, 0)
    updates, _ = opt.update(grads, opt.init(params), params, 3)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(updates[name], -0.1 / 4 * 4.0 * grads[name])


# --------------------------------------------------------------------------- purity, structure, state


ALL_OPTIMIZERS = {
    "adamw": lambda: chain(clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1, decay_mask=default_decay_mask)),
    "sgd": lambda: optim.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.1, decay_mask=default_decay_mask),
    "adafactor": lambda: optim.adafactor(1e-2, beta1=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_update_does_not_mutate_inputs(name):
    opt = ALL_OPTIMIZERS[name]()
    params = make_params()
    state = opt.init(params)
    for step in range(2):  # second step sees non-zero state
        grads = make_grads(params, step)
        snapshot = [{n: t.clone() for n, t in named.items()} for named in (params, grads, by_path(state))]
        updates, new_state = opt.update(grads, state, params, step)
        new_params = apply_updates(params, updates)
        for before, after in zip(snapshot, (params, grads, by_path(state))):
            assert_trees_close(after, before, atol=0.0)
        params, state = new_params, new_state


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_state_round_trips_through_safetensors_and_resumes_identically(name, tmp_path):
    from safetensors.torch import load_file, save_file

    opt = ALL_OPTIMIZERS[name]()
    params = make_params()
    state = opt.init(params)
    for step in range(2):
        updates, state = opt.update(make_grads(params, step), state, params, step)
        params = apply_updates(params, updates)
    save_file(by_path(state), str(tmp_path / "opt.safetensors"))
    loaded = load_file(str(tmp_path / "opt.safetensors"))
    like = opt.init(params)
    restored = tree.replace_leaves(like, [loaded[path] for path, _ in tree.leaves_with_paths(like)])
    assert_trees_close(by_path(restored), by_path(state), atol=0.0)
    a, _ = opt.update(make_grads(params, 2), state, params, 2)
    b, _ = opt.update(make_grads(params, 2), restored, params, 2)
    assert_trees_close(a, b, atol=0.0)


def test_nested_param_trees_match_flat_ones():
    flat = make_params()
    nested: dict = {}
    for name, t in flat.items():
        *parents, leaf = name.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = t
    opt = optim.adamw(1e-2, weight_decay=0.1, decay_mask=default_decay_mask)
    grads_flat = make_grads(flat, 0)
    grads_nested = tree.replace_leaves(nested, [grads_flat[n] for n, _ in tree.leaves_with_paths(nested)])
    u_nested, s_nested = opt.update(grads_nested, opt.init(nested), nested, 0)
    u_flat, s_flat = opt.update(grads_flat, opt.init(flat), flat, 0)
    new_nested = apply_updates(nested, u_nested)
    assert new_nested["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"].shape == (6, 4)
    assert_trees_close(by_path(u_nested), u_flat, atol=0.0)
    assert by_path(s_nested).keys() == by_path(s_flat).keys()


def test_apply_updates_keeps_param_dtype():
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = apply_updates(params, {"w": torch.full((3,), 0.5, dtype=torch.float32)})
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))
