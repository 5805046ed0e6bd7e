"""Per-parameter learning rates and weight decay: the default decay mask, LoRA+, ``lr_groups``
and embedding learning rates, as param groups that the lr and decay transforms read."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

from torch import Tensor

from pure.optim.base import PathFn


def default_decay_mask(path: str, param: Tensor | None = None) -> bool:
    """Whether a parameter gets weight decay: not biases (``*.bias``), not norm
    weights (path contains ``norm``), not 1-D tensors."""
    if path.endswith(".bias") or path == "bias" or "norm" in path.lower():
        return False
    if param is not None and param.ndim <= 1:
        return False
    return True


class ParamGroup(NamedTuple):
    """A named set of parameters with its own lr multiplier (first matching group wins).

    ``match(path, param) -> bool``; ``lr_scale`` multiplies the scheduled lr
    (HF param groups are scheduled by a multiplicative ``LambdaLR``, so an
    absolute group lr L becomes ``L / learning_rate``); ``decay`` False turns
    weight decay off for the group, None leaves it to the decay mask.
    """

    name: str
    match: Callable[[str, Tensor], bool]
    lr_scale: float = 1.0
    decay: bool | None = None


def _substring_matcher(substrings: Sequence[str]) -> Callable[[str, Tensor], bool]:
    subs = tuple(substrings)
    return lambda path, param: any(s in path for s in subs)


def _is_lora_leaf(path: str, letter: str) -> bool:
    return path.endswith(f".{letter}") or path.endswith(f".lora_{letter}") or f".lora_{letter}." in path


def make_param_groups(
    learning_rate: float,
    *,
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float | None = 1e-6,
    lr_groups: Sequence[Mapping[str, Any]] | None = None,
    embedding_lr: float | None = None,
    embedding_lr_scale: float | None = None,
    embedding_modules: Sequence[str] = ("embed_tokens",),
) -> list[ParamGroup]:
    """Param groups from the config keys ``loraplus_lr_ratio``, ``loraplus_lr_embedding``,
    ``lr_groups``, ``embedding_lr`` and ``embedding_lr_scale`` (first match wins).

    - LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): LoRA
      leaves of an embedding (path contains an ``embedding_modules`` entry)
      get the absolute lr ``loraplus_lr_embedding``; LoRA ``B`` leaves (path
      ending ``.B``) and 1-D trainables (DoRA ``.m``) get ``lr * loraplus_lr_ratio``;
      ``A`` keeps ``lr``.
    - Embeddings (paths containing ``embed_tokens``): ``lr * embedding_lr_scale``
      (which wins) or ``embedding_lr``, without weight decay (as axolotl).
    - ``lr_groups``: ``[{name, modules: [substrings], lr}]``, absolute lrs.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0 to derive group lr scales, got {learning_rate}")
    groups: list[ParamGroup] = []
    is_embedding = _substring_matcher(embedding_modules)
    if loraplus_lr_ratio is not None:
        emb_lr = 1e-6 if loraplus_lr_embedding is None else loraplus_lr_embedding
        groups.append(
            ParamGroup(
                "loraplus_embedding",
                lambda path, p: is_embedding(path, p) and (_is_lora_leaf(path, "A") or _is_lora_leaf(path, "B")),
                emb_lr / learning_rate,
            )
        )
        # PEFT puts every trainable 1-D tensor (DoRA magnitudes ``.m``, biases) with B.
        groups.append(
            ParamGroup("loraplus_B", lambda path, p: _is_lora_leaf(path, "B") or p.ndim == 1, float(loraplus_lr_ratio))
        )
    if embedding_lr_scale is not None or embedding_lr is not None:
        scale = embedding_lr_scale if embedding_lr_scale is not None else embedding_lr / learning_rate
        groups.append(ParamGroup("embeddings", is_embedding, float(scale), decay=False))
    for group in lr_groups or ():
        missing = {"name", "modules", "lr"} - set(group)
        if missing:
            raise ValueError(f"lr_groups entry {dict(group)} lacks {sorted(missing)}")
        groups.append(ParamGroup(str(group["name"]), _substring_matcher(group["modules"]), float(group["lr"]) / learning_rate))
    return groups


def _group_of(groups: Sequence[ParamGroup], path: str, param: Tensor) -> ParamGroup | None:
    for group in groups:
        if group.match(path, param):
            return group
    return None


def param_group_lr_scales(groups: Sequence[ParamGroup]) -> Callable[[str, Tensor], float]:
    """``(path, param) -> lr multiplier`` of the first matching group (1.0 if none)."""

    def lr_scale(path: str, param: Tensor) -> float:
        group = _group_of(groups, path, param)
        return 1.0 if group is None else group.lr_scale

    return lr_scale


def param_group_decay_mask(groups: Sequence[ParamGroup], base_mask: PathFn | None) -> PathFn:
    """``(path, param) -> bool``: the first matching group's ``decay`` where it sets one, else
    ``base_mask`` (every parameter when None)."""

    def mask(path: str, param: Tensor) -> bool:
        group = _group_of(groups, path, param)
        if group is not None and group.decay is not None:
            return group.decay
        return True if base_mask is None else bool(base_mask(path, param))

    return mask
