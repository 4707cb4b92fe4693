"""Parameter groups: which parameters get weight decay and layer adaptation (LAMB/LARS trust ratio).

Biases, LayerNorm/RMSNorm gains and Admin's ω should neither be decayed nor layer-adapted: decaying a norm gain
towards 0 shrinks the whole residual branch, and a trust ratio on a 768-element bias vector gives it a step size
unrelated to its role. MLPerf's LAMB reference excludes the same list from both; LARS recipes (MLPerf skip list,
BYOL/VICReg `ndim == 1` filters) do too. `param_groups` builds that split with the Trainer's own naming conventions,
so `Trainer(optimizers=(Lamb(param_groups(model, 0.01)), None))` decays exactly what the Trainer would decay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn


__all__ = ["ADMIN_OMEGA_SUFFIX", "LAYER_ADAPTATION_KEY", "TRAINER_NO_DECAY_PATTERNS", "param_groups"]

# `transformers.Trainer.get_decay_parameter_names` (v5.23): regexes searched in the lower-cased full name, plus
# every parameter inside an `nn.LayerNorm`.
TRAINER_NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)
ADMIN_OMEGA_SUFFIX = "admin_omega"
LAYER_ADAPTATION_KEY = "layer_adaptation"


def _params_inside(model: nn.Module, module_types: tuple[type, ...]) -> set[int]:
    inside: set[int] = set()
    if not module_types:
        return inside
    for module in model.modules():
        if isinstance(module, module_types):
            inside.update(id(p) for p in module.parameters())
    return inside


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: Iterable[str] = TRAINER_NO_DECAY_PATTERNS,
    no_decay_modules: Sequence[type[nn.Module]] = (nn.LayerNorm,),
    exclude_1d: bool = True,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed group and a no-decay, no-adaptation group.

    A parameter goes to the no-decay group (`weight_decay=0.0`, `layer_adaptation=False`) when any of these holds:
    its lower-cased name matches a `no_decay` regex (default: the Trainer's `get_decay_parameter_names` patterns:
    bias, layernorm, rmsnorm, `.norm.`, `_norm`), it lives in a `no_decay_modules` module (default `nn.LayerNorm`,
    as the Trainer), it has `ndim <= 1` (`exclude_1d`: biases and norm gains of any naming), or its name ends with
    `admin_omega` (Admin's ω, always). Every other trainable parameter goes to the decayed group
    (`weight_decay=weight_decay`, layer adaptation on). Parameters with `requires_grad=False` are left out; empty
    groups are omitted; shared (tied) parameters appear once.

    The `layer_adaptation` group key is honoured by `hf_clinic.Lamb` and `hf_clinic.Lars` in every `adapt` mode:
    a group with `layer_adaptation=False` never gets a trust ratio. Other optimizers ignore it.

    Args:
        model (`torch.nn.Module`):
            The model whose parameters to group.
        weight_decay (`float`):
            Weight decay of the decayed group.
        no_decay (`Iterable[str]`, *optional*, defaults to `TRAINER_NO_DECAY_PATTERNS`):
            Regexes searched (`re.search`) in the lower-cased full parameter name.
        no_decay_modules (`Sequence[type]`, *optional*, defaults to `(nn.LayerNorm,)`):
            Module types whose parameters are never decayed.
        exclude_1d (`bool`, *optional*, defaults to `True`):
            Put every parameter with `ndim <= 1` in the no-decay group.

    Returns:
        `list[dict]`: param groups for any `torch.optim.Optimizer`.

    Raises:
        ValueError: if `weight_decay` is negative or a `no_decay` pattern is not a valid regex.

    Example:
        ```python
        >>> from torch import nn
        >>> from hf_clinic import param_groups
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        >>> [(g["weight_decay"], len(g["params"])) for g in param_groups(model, 0.01)]
        [(0.01, 1), (0.0, 3)]
        ```
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    try:
        patterns = [re.compile(p) for p in no_decay]
    except re.error as err:
        raise ValueError(f"Invalid no_decay pattern: {err.pattern!r} ({err})") from err
    excluded_by_module = _params_inside(model, tuple(no_decay_modules))

    decay, no_decay_params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lower = name.lower()
        excluded = (
            name.endswith(ADMIN_OMEGA_SUFFIX)
            or (exclude_1d and param.ndim <= 1)
            or id(param) in excluded_by_module
            or any(p.search(lower) for p in patterns)
        )
        (no_decay_params if excluded else decay).append(param)

    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay_params:
        groups.append({"params": no_decay_params, "weight_decay": 0.0, LAYER_ADAPTATION_KEY: False})
    return groups
