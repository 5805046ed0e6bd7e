"""programs/optimizers.py: each optimizer name the config accepts builds its reference's math, and
`optim_args` reaches the optimizer or is refused by name."""
import pytest
import torch

from programs.common import build_optimizer_from_config
from programs.config import validate
from programs.optimizers import OPTIMIZERS, build_optimizer, optim_args_of, parse_optim_args
from pure.optim import default_decay_mask, global_norm, grad_norm_from_state, make_param_groups
from pure.tree import leaves_with_paths
from tests.pure.test_optim import assert_trees_close, make_grads, make_params, run_pure, run_torch


class Lion(torch.optim.Optimizer):
    """Lion as the paper's Algorithm 2 (and lion-pytorch) writes it, with decoupled weight decay."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(b1 * m + (1 - b1) * p.grad), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def adafactor(groups, lr):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)


def clipped_torch_history(make_optimizer, params, steps, groups):
    """The params after each step of a torch optimizer over named param ``groups``, the gradients
    clipped to norm 1.0 first (``clip_grad_norm_``), as ``build_optimizer(max_grad_norm=1.0)`` does."""
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = make_optimizer([{**g, "params": [torch_params[n] for n in g["params"]]} for g in groups])
    history = []
    for step in range(steps):
        grads = make_grads(params, step)
        for n, p in torch_params.items():
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 1.0)
        opt.step()
        history.append({n: p.detach().clone() for n, p in torch_params.items()})
    return history


# Each name puretune runs -> its reference, built from param groups with the config's defaults.
REFERENCES = {
    "adamw_torch": lambda groups, lr: torch.optim.AdamW(groups, lr=lr, foreach=False),
    "adamw_torch_fused": lambda groups, lr: torch.optim.AdamW(groups, lr=lr, fused=True),
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr),
    "adafactor": adafactor,
    "lion_32bit": lambda groups, lr: Lion(groups, lr=lr),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_name_steps_like_its_reference(name):
    """Weight decay on all but biases and norms, clipping at 1.0, five steps."""
    params = make_params()
    lr, wd = 1e-2, 0.1
    ours, _ = run_pure(build_optimizer(name, lr, weight_decay=wd, max_grad_norm=1.0), params, 5)
    decay = [n for n, p in params.items() if default_decay_mask(n, p)]
    no_decay = [n for n in params if n not in decay]
    ref = clipped_torch_history(lambda groups: REFERENCES[name](groups, lr), params, 5, [
        {"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}])
    for mine, theirs in zip(ours, ref):
        assert_trees_close(mine, theirs, atol=1e-6)


def test_build_optimizer_adamw_with_groups_matches_torch_param_groups():
    """Decay mask + lr groups + clipping equal torch AdamW with explicit param groups."""
    params = make_params()
    lr, wd = 1e-2, 0.1
    groups = make_param_groups(lr, lr_groups=[{"name": "q", "modules": ["q_proj.weight"], "lr": 3e-3}])
    opt = build_optimizer("adamw_torch_fused", lr, weight_decay=wd, adam_beta2=0.99, max_grad_norm=1.0, param_groups=groups)
    ours, _ = run_pure(opt, params, 5)

    q = ["model.layers.0.self_attn.q_proj.weight"]
    decay = [n for n, p in params.items() if n not in q and default_decay_mask(n, p)]
    no_decay = [n for n, p in params.items() if n not in q and not default_decay_mask(n, p)]
    assert set(no_decay) == {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight", "model.norm.weight"}
    ref = clipped_torch_history(
        lambda groups: torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-8, foreach=False), params, 5, [
            {"params": decay, "weight_decay": wd, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
            {"params": q, "weight_decay": wd, "lr": 3e-3},
        ])
    for mine, theirs in zip(ours, ref):
        assert_trees_close(mine, theirs, atol=1e-6)


def test_build_optimizer_records_grad_norm_even_without_clipping():
    params = make_params()
    opt = build_optimizer("adamw_torch", 1e-3, max_grad_norm=None)
    grads = make_grads(params, 0)
    _, state = opt.update(grads, opt.init(params), params, 0)
    assert float(grad_norm_from_state(state)) == pytest.approx(float(global_norm(grads)), rel=1e-6)


def test_unknown_optimizer_names_the_closest_match():
    with pytest.raises(ValueError, match="adamw_torch_fused") as err:
        build_optimizer("adamw_torch_fusd", 1e-3)
    assert "Did you mean 'adamw_torch_fused'" in str(err.value)
    assert ", ".join(OPTIMIZERS) in str(err.value)


def test_sgd_optim_args_pass_momentum():
    params = make_params()
    ours, _ = run_pure(build_optimizer("sgd", 0.05, optim_args="momentum=0.9,nesterov=true"), params, 3)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True), params, 3)
    assert_trees_close(ours[-1], ref[-1], atol=1e-6)


def test_optim_args_momentum_in_the_config_gives_sgd_a_momentum_buffer():
    config = validate({"base_model": "smollm2-135m-instruct", "learning_rate": 0.1, "lr_scheduler": "constant",
                       "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "optimizer": "sgd",
                       "optim_args": "momentum=0.9", "max_grad_norm": 0})
    optimizer, _ = build_optimizer_from_config(config, total_steps=10)
    params = make_params()
    g0, g1 = make_grads(params, 0), make_grads(params, 1)
    state = optimizer.init(params)
    buffers = [path for path, _ in leaves_with_paths(state) if ".momentum." in path]
    assert len(buffers) == len(params)
    _, state = optimizer.update(g0, state, params, 0)
    second, _ = optimizer.update(g1, state, params, 1)
    for n in params:  # b = 0.9 g0 + g1, not g1 alone
        torch.testing.assert_close(second[n], -0.1 * (0.9 * g0[n] + g1[n]))


@pytest.mark.parametrize("name, optim_args, accepted", [
    ("sgd", "momentum=0.9,dampening=0.1", "momentum, nesterov"),
    ("sgd", {"weight_decay": 0.1}, "momentum, nesterov"),
    ("adafactor", "beta2=0.9", "beta1, clip_threshold, decay_rate"),
    ("adamw_torch", "momentum=0.9", "none"),
])
def test_unknown_optim_args_are_refused_with_the_accepted_ones(name, optim_args, accepted):
    with pytest.raises(ValueError) as err:
        build_optimizer(name, 1e-3, optim_args=optim_args)
    message = str(err.value)
    assert message.startswith("optim_args:") and name in message and message.endswith(f"accepts {accepted}")
    assert repr(sorted(set(parse_optim_args(optim_args)) - set(optim_args_of(name)))[0]) in message


def test_optim_args_string_is_parsed_as_hugging_face_writes_it():
    assert parse_optim_args("momentum=0.9, nesterov=True,steps=3,kind=x") == {
        "momentum": 0.9, "nesterov": True, "steps": 3, "kind": "x"}
    assert parse_optim_args(None) == {} and parse_optim_args({"beta1": 0.5}) == {"beta1": 0.5}
    with pytest.raises(ValueError, match="optim_args: 'momentum' is not name=value"):
        parse_optim_args("momentum")
