"""programs/optimizers.py: each optimizer name the config accepts builds its reference's math, and
`optim_args` reaches the optimizer or is refused by name."""
import math

import pytest
import torch

from programs.common import build_optimizer_from_config
from programs.config import validate
from programs.optimizers import OPTIMIZERS, build_optimizer, optim_args_of, parse_optim_args
from pure.optim import (
    default_decay_mask,
    global_norm,
    grad_norm_from_state,
    make_param_groups,
    schedule_free_eval_params,
)
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


NAMES: dict[int, str] = {}  # id(torch parameter) -> its name, for references that split by name


def clipped_torch_history(make_optimizer, params, steps, groups):
    """The params after each step of a torch optimizer over named param ``groups``, the gradients
    clipped to norm 1.0 first (``clip_grad_norm_``), as ``build_optimizer(max_grad_norm=1.0)`` does."""
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    NAMES.clear()
    NAMES.update({id(p): n for n, p in torch_params.items()})
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


# --------------------------------------------------------------------------- the names built on packages

bnb = pytest.importorskip("bitsandbytes")


class ADOPT(torch.optim.Optimizer):
    """ADOPT as the paper's Algorithm 2 writes it (Taniguchi et al. 2024), decoupled decay, clip t^(1/4)."""

    def __init__(self, params, lr, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=p.grad * p.grad)
                    continue
                state["t"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                clip = state["t"] ** 0.25
                normed = (p.grad / torch.clamp(state["v"].sqrt(), min=group["eps"])).clamp(-clip, clip)
                state["m"].mul_(b1).add_(normed, alpha=1 - b1)
                p.sub_(group["lr"] * state["m"])
                state["v"].mul_(b2).add_(p.grad * p.grad, alpha=1 - b2)


class MuonWithAdamW:
    """torch.optim.Muon (Moonlight's lr adjustment) on the hidden matrices, torch AdamW on the rest."""

    def __init__(self, groups, lr, names):
        from programs.optimizers import muon_label

        split = {"muon": [], "adamw": []}
        for g in groups:
            for label in split:
                ps = [p for p in g["params"] if muon_label(names[id(p)], p) == label]
                if ps:
                    split[label].append({**g, "params": ps})
        self.optimizers = [torch.optim.Muon(split["muon"], lr=lr, adjust_lr_fn="match_rms_adamw"),
                           torch.optim.AdamW(split["adamw"], lr=lr, foreach=False)]

    def step(self):
        for opt in self.optimizers:
            opt.step()


def schedule_free(cls):
    def make(groups, lr):
        opt = cls(groups, lr=lr, warmup_steps=0, foreach=False)
        opt.train()
        return opt
    return make


def _bnb(cls, **kwargs):
    return lambda groups, lr: cls(groups, lr=lr, **kwargs)


def _torchao(name):
    import torchao.optim

    return lambda groups, lr: getattr(torchao.optim, name)(groups, lr=lr)


REFERENCES.update({
    # HF's bitsandbytes mapping (trainer_optimizer._get_bitsandbytes_optimizer); tiny tensors: 32-bit state
    "adamw_bnb_8bit": _bnb(bnb.optim.AdamW, optim_bits=8),
    "adamw_8bit": _bnb(bnb.optim.AdamW, optim_bits=8),
    "paged_adamw_8bit": _bnb(bnb.optim.AdamW, optim_bits=8, is_paged=True),
    "paged_adamw_32bit": _bnb(bnb.optim.AdamW, optim_bits=32, is_paged=True),
    "lion_8bit": _bnb(bnb.optim.Lion, optim_bits=8, betas=(0.9, 0.99)),
    "paged_lion_8bit": _bnb(bnb.optim.Lion, optim_bits=8, betas=(0.9, 0.99), is_paged=True),
    "paged_lion_32bit": _bnb(bnb.optim.Lion, optim_bits=32, betas=(0.9, 0.99), is_paged=True),
    "rmsprop_bnb": _bnb(bnb.optim.RMSprop, optim_bits=32),
    "rmsprop_bnb_8bit": _bnb(bnb.optim.RMSprop, optim_bits=8),
    "rmsprop_bnb_32bit": _bnb(bnb.optim.RMSprop, optim_bits=32),
    "ademamix": _bnb(bnb.optim.AdEMAMix, optim_bits=32),
    "ademamix_8bit": _bnb(bnb.optim.AdEMAMix, optim_bits=8),
    "paged_ademamix_8bit": _bnb(bnb.optim.AdEMAMix, optim_bits=8, is_paged=True),
    "paged_ademamix_32bit": _bnb(bnb.optim.AdEMAMix, optim_bits=32, is_paged=True),
    "adamw_torch_8bit": _torchao("AdamW8bit"),
    "adamw_torch_4bit": _torchao("AdamW4bit"),
    "ao_adamw_8bit": _torchao("AdamW8bit"),
    "ao_adamw_4bit": _torchao("AdamW4bit"),
    "ao_adamw_fp8": _torchao("AdamWFp8"),
    "optimi_adamw": lambda groups, lr: __import__("optimi").AdamW(groups, lr=lr, foreach=False),
    "adopt_adamw": lambda groups, lr: ADOPT(groups, lr=lr),
    "schedule_free_adamw": schedule_free(__import__("schedulefree").AdamWScheduleFree),
    "schedule_free_sgd": schedule_free(__import__("schedulefree").SGDScheduleFree),
})


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_name_steps_like_its_reference(name, monkeypatch):
    """Weight decay on all but biases and norms, clipping at 1.0, five steps."""
    # torchao's classes compile their update; the reference runs the same function eagerly (~30 s saved)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    params = make_params()
    lr, wd = 1e-2, 0.1
    ours, _ = run_pure(build_optimizer(name, lr, weight_decay=wd, max_grad_norm=1.0), params, 5)
    decay = [n for n, p in params.items() if default_decay_mask(n, p)]
    no_decay = [n for n in params if n not in decay]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "muon":
        make = lambda torch_groups: MuonWithAdamW(torch_groups, lr, NAMES)  # noqa: E731
    else:
        make = lambda torch_groups: REFERENCES[name](torch_groups, lr)  # noqa: E731
    ref = clipped_torch_history(make, params, 5, groups)
    # 1e-6: the wrapped and rewritten optimizers return new_p - p, which the step adds back to p: one
    # fp32 rounding of |p| where the step is over half |p|; bitsandbytes' 8-bit names keep 32-bit state
    # for these tiny tensors (as bnb does), the 8-bit codes are tested in tests/kernels
    for mine, theirs in zip(ours, ref):
        assert_trees_close(mine, theirs, atol=1e-6)


@pytest.mark.parametrize("name, cls", [("schedule_free_adamw", "AdamWScheduleFree"),
                                       ("schedule_free_sgd", "SGDScheduleFree")])
def test_schedule_free_eval_weights_are_the_packages_x(name, cls):
    """Training moves y; the weights to evaluate and export are x = lerp(y, z, 1 - 1/beta), what the
    package's optimizer.eval() puts into the parameters."""
    import schedulefree

    params = make_params()
    ours, state = run_pure(build_optimizer(name, 1e-2, weight_decay=0.1), params, 4)
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    decays = [p for n, p in torch_params.items() if default_decay_mask(n, p)]
    rest = [p for n, p in torch_params.items() if not default_decay_mask(n, p)]
    ref = getattr(schedulefree, cls)([{"params": decays, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-2, foreach=False)
    ref.train()
    for step in range(4):
        for n, g in make_grads(params, step).items():
            torch_params[n].grad = g.clone()
        ref.step()
    ref.eval()
    x = schedule_free_eval_params(ours[-1], state)
    assert_trees_close(x, {n: p.detach() for n, p in torch_params.items()}, atol=1e-6)  # as the step test
    assert not torch.equal(x["model.norm.weight"], ours[-1]["model.norm.weight"])  # x is not y
    assert schedule_free_eval_params(params, build_optimizer("adamw_torch", 1e-2).init(params)) is params


# --------------------------------------------------------------------------- through a YAML config

NEW_NAMES = sorted(set(OPTIMIZERS) - {"adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "lion_32bit"})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One tokenised-dataset cache for all the runs below (the same rows and tokenizer)."""
    return tmp_path_factory.mktemp("prepared")


def full_finetune_config(tmp_path, tiny_model, name, optimizer, prepared=None, **overrides):
    """The SFT test config, full fine-tuning (the 49152 x 32 embedding is big enough for 8-bit state),
    constant lr from step 1 (so step 1 moves the weights), no eval, 16 rows."""
    from tests.programs.test_sft import write_config

    if prepared is not None:
        overrides["dataset_prepared_path"] = str(prepared)
    return write_config(tmp_path, tiny_model, name, optimizer=optimizer, adapter=None, lora_r=None, lora_alpha=None,
                        lora_dropout=None, lora_target_linear=None, neftune_noise_alpha=None, warmup_steps=0,
                        lr_scheduler="constant", learning_rate=1e-3, val_set_size=0, eval_steps=None,
                        gradient_accumulation_steps=1, **overrides)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer", NEW_NAMES)
def test_every_new_optimizer_name_trains_two_steps_from_yaml(tmp_path, tiny_model, prepared, initial_embedding,
                                                             optimizer):
    from programs.config import load_config
    from programs.sft import run

    result = run(load_config(full_finetune_config(tmp_path, tiny_model, "run", optimizer, prepared, max_steps=2,
                                                  save_strategy="no")))
    state = result["state"]
    losses = [r["train/loss"] for r in result["records"] if "train/loss" in r]
    assert result["step"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    embed = state.trainable["params"]["model.embed_tokens.weight"]
    assert not torch.equal(embed, initial_embedding)  # the optimizer moved the weights
    dtypes = {leaf.dtype for _, leaf in leaves_with_paths(state.opt_state)}
    low_bit = ("8bit" in optimizer and "galore" not in optimizer) or optimizer.startswith(("ao_", "adamw_torch_"))
    assert (torch.uint8 in dtypes or torch.float8_e4m3fn in dtypes) == low_bit, dtypes


@pytest.fixture(scope="module")
def initial_embedding(tiny_model):
    from backends.hf import load_pretrained

    params, _, _ = load_pretrained(str(tiny_model))
    return params["model.embed_tokens.weight"]


def test_resume_with_an_8bit_optimizer_is_bitwise_identical(tmp_path, tiny_model):
    """4 steps straight vs 2 + resume 2 with adamw_8bit: params, the uint8 codes, absmax and qmaps of
    the optimizer state, and every logged loss equal bit for bit."""
    from programs.config import load_config
    from programs.sft import run
    from tests.programs.test_sft import assert_bitwise_equal, final_state, trained_losses

    straight = run(load_config(full_finetune_config(tmp_path, tiny_model, "straight", "adamw_8bit", max_steps=4,
                                                    save_steps=2)))
    first = run(load_config(full_finetune_config(tmp_path, tiny_model, "split", "adamw_8bit", max_steps=4,
                                                 save_steps=2)), stop_after_step=2)
    assert first["stopped"] and first["step"] == 2
    resumed = run(load_config(full_finetune_config(tmp_path, tiny_model, "split", "adamw_8bit", max_steps=4,
                                                   save_steps=2, auto_resume_from_checkpoints=True)))
    assert resumed["step"] == 4 and trained_losses(resumed) == trained_losses(straight)
    saved = final_state(tmp_path / "split")
    assert any(v.dtype == torch.uint8 for v in saved.values())  # the 8-bit codes are in the checkpoint
    assert_bitwise_equal(saved, final_state(tmp_path / "straight"))
