"""Optimizer names: one table from name to (class, preset defaults), `create_optimizer` and `list_optimizers`.

The table `OPTIMIZERS` is the single source of truth for optimizer names: `hf_clinic.integrations` registers every
name in it with `TrainingArguments.optim`. Variants are data (an entry with `defaults`), not subclasses, as in timm's
`OptimInfo` registry: `lamb_nvlamb` is `Lamb` with `{"preset": "nvlamb"}`, `larc` is `Lars` with
`{"clip_mode": "larc"}`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .integrations.accelerate import check_sharding_support
from .optim import GeneralizedSignSGD, Lamb, Lars, RAdam
from .optim.lamb import LAMB_PRESETS
from .param_groups import param_groups


__all__ = ["OPTIMIZERS", "OptimizerInfo", "create_optimizer", "get_optimizer_info", "list_optimizers"]


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer name.

    Args:
        name (`str`): lower-case name, e.g. `"lamb_nvlamb"`.
        optimizer_class (`type[torch.optim.Optimizer]`): the class it builds.
        description (`str`): one line for listings and `--help`.
        defaults (`Mapping[str, Any]`): keyword arguments this name sets (a preset, a variant switch); explicit
            keyword arguments of `create_optimizer` override them.
    """

    name: str
    optimizer_class: type[Optimizer]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def resolved_defaults(self) -> dict[str, Any]:
        """Every constructor keyword argument with the value this name uses when the caller passes nothing.

        The class signature's defaults, then a LAMB preset's values, then this entry's `defaults`. Arguments
        without a default (LARS's `lr`) are absent.
        """
        resolved = {
            name: p.default
            for name, p in inspect.signature(self.optimizer_class.__init__).parameters.items()
            if name not in ("self", "params") and p.default is not inspect.Parameter.empty
        }
        preset = self.defaults.get("preset")
        if preset is not None:
            resolved.update({k: v for k, v in LAMB_PRESETS[preset].items() if k in resolved})
        resolved.update(self.defaults)
        return resolved


def _entries() -> tuple[OptimizerInfo, ...]:
    lamb_presets = {
        "paper": "LAMB as in the paper (v5) / MLPerf reference: bias-corrected, adapt decayed layers",
        "nvlamb": "LAMB as NVIDIA apex FusedLAMB(use_nvlamb=True): global grad pre-normalisation, adapt all",
        "timm": "LAMB as timm Lamb defaults: global grad clip 1.0, adapt decayed layers",
        "deepspeed": "LAMB as DeepSpeed FusedLamb: step scaling outside the ratio, ratio clamped to [0.01, 10]",
        "optax": "LAMB as optax.lamb: trust ratio on every layer, no weight decay by default",
    }
    return (
        OptimizerInfo("radam", RAdam, "RAdam, official-code warm phase (skip while rho_t <= 5), decoupled decay"),
        OptimizerInfo(
            "radam_sgd",
            RAdam,
            "RAdam with a momentum-SGD warm phase (= torch.optim.RAdam(decoupled_weight_decay=True))",
            {"warm_phase": "sgd"},
        ),
        OptimizerInfo("lamb", Lamb, "LAMB (layer-wise adaptive moments), paper defaults"),
        *(OptimizerInfo(f"lamb_{p}", Lamb, d, {"preset": p}) for p, d in lamb_presets.items()),
        OptimizerInfo("lambc", Lamb, "LAMBC: LAMB with the trust ratio clipped at 1", {"trust_clip": 1.0}),
        OptimizerInfo("lars", Lars, "LARS (layer-wise adaptive rate scaling), lr inside the momentum as the paper"),
        OptimizerInfo("larc", Lars, "LARC: LARS with the local lr clipped at the global lr", {"clip_mode": "larc"}),
        OptimizerInfo("gsignsgd", GeneralizedSignSGD, "Generalized SignSGD (m / sqrt(EMA of m^2))"),
    )


OPTIMIZERS: Mapping[str, OptimizerInfo] = MappingProxyType({info.name: info for info in _entries()})


def list_optimizers() -> list[str]:
    """Every optimizer name `create_optimizer` (and `TrainingArguments.optim`, once hf_clinic is imported) accepts."""
    return sorted(OPTIMIZERS)


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The table entry for `name`; raises `ValueError` listing every valid name when it is unknown."""
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(list_optimizers())}")
    return OPTIMIZERS[key]


def create_optimizer(model_or_params: nn.Module | Iterable[Any], name: str, **kwargs: Any) -> Optimizer:
    """Build the optimizer registered as `name`.

    Args:
        model_or_params (`torch.nn.Module` or iterable of parameters / param groups):
            A module is split with `hf_clinic.param_groups(model, weight_decay)` (no decay and no layer adaptation
            for biases, norm gains and Admin's ω); anything else is passed to the optimizer unchanged.
        name (`str`):
            A name from `list_optimizers()` (case-insensitive).
        **kwargs:
            Constructor keyword arguments; they override the entry's defaults (and a LAMB preset).

    Returns:
        `torch.optim.Optimizer`

    Raises:
        ValueError: for an unknown name (the message lists every valid name) or an invalid hyperparameter.
        NotImplementedError: for a model under a sharded backend the optimizer would step wrongly (FSDP1, DeepSpeed
            ZeRO-3, and ZeRO-1/2 for LAMB/LARS); see `hf_clinic.integrations.accelerate.check_sharding_support`.

    Example:
        ```python
        >>> from torch import nn
        >>> from hf_clinic import create_optimizer
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        >>> optimizer = create_optimizer(model, "lamb_nvlamb", lr=2e-3, weight_decay=0.01)
        >>> type(optimizer).__name__, optimizer.defaults["max_grad_norm"]
        ('Lamb', 1.0)
        ```
    """
    info = get_optimizer_info(name)
    options = {**info.defaults, **kwargs}
    if isinstance(model_or_params, nn.Module):
        # The Trainer path checks this in its handler; plain Accelerate loops come through here.
        check_sharding_support(info.optimizer_class, model=model_or_params)
        weight_decay = options.get("weight_decay", info.resolved_defaults.get("weight_decay", 0.0))
        params = param_groups(model_or_params, weight_decay)
    else:
        params = model_or_params
    return info.optimizer_class(params, **options)
