"""`TrainingArguments(optim="radam")`: every hf-clinic optimizer name, resolved by the Trainer.

On import (`import hf_clinic` imports this module), [`register_trainer_optimizers`] adds every name of the optimizer registry
(`hf_clinic.list_optimizers()`: `radam`, `lamb`, `lamb_nvlamb`, `lars`, `gsignsgd`, ...) to
`transformers.training_args.OptimizerNames` and installs one handler for all of them in the Trainer's dispatch dict
(see `hf_clinic.integrations.names`). The handler builds the optimizer the way `hf_clinic.create_optimizer` does:

* parameter groups from `hf_clinic.param_groups(model, args.weight_decay)` (no decay and no layer adaptation for
  biases, norm gains and Admin's ω; frozen parameters, e.g. under PEFT, are left out);
* `lr = args.learning_rate` and `weight_decay = args.weight_decay`, always;
* `betas = (args.adam_beta1, args.adam_beta2)` and `eps = args.adam_epsilon` for the Adam-style optimizers (RAdam,
  LAMB, GSignSGD), only when they differ from the `TrainingArguments` defaults: those defaults are AdamW's, and an
  optimizer or preset with its own (LAMB's `eps=1e-6`) keeps them. LARS has no Adam moments: setting these fields
  with `optim="lars"` warns that they are unused;
* the registry entry's own defaults (a LAMB preset, `clip_mode="larc"`, ...);
* `optim_args`, parsed with the types of the optimizer's constructor (see [`optim_args_keys`]).

`optim_args` arrives as one string that transformers splits on `,` and `=`, so tuple values are spelled as separate
keys: `optim_args="beta1=0.9,beta2=0.98,telemetry=false"`. Unknown keys, malformed pairs and values of the wrong
type are rejected while `TrainingArguments` is built (and again when the Trainer builds the optimizer, for arguments
changed afterwards with `set_optimizer`), with a message that lists the valid keys.

NOTE: the enum members pickle as plain strings, so `training_args.bin` of a run with `optim="radam"` loads where
hf_clinic is not installed (`args.optim` is then the string `"radam"`).
NOTE: two transformers entry points are wrapped, both idempotently and only to validate hf-clinic names early:
`TrainingArguments.__post_init__` and the static `Trainer.get_optimizer_cls_and_kwargs` (which would otherwise fail
on a malformed `optim_args` string with a bare unpacking error before any handler runs).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
import warnings
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any

import torch
import transformers

from ..optim import GeneralizedSignSGD, Lamb, Lars, RAdam
from ..param_groups import param_groups
from ..registry import OPTIMIZERS, get_optimizer_info
from .accelerate import check_sharding_support
from .names import SUPPORTED_TRANSFORMERS, _internals, register_optimizer_name


__all__ = [
    "IgnoredTrainingArgumentWarning",
    "NameCollisionWarning",
    "OptimArgKey",
    "optim_args_keys",
    "optimizer_handler",
    "parse_optim_args",
    "register_trainer_optimizers",
    "trainer_optimizer_kwargs",
    "trainer_optimizer_names",
    "validate_training_args",
]


class NameCollisionWarning(UserWarning):
    """transformers already defines an optimizer name that hf-clinic also uses; the built-in one is kept."""


class IgnoredTrainingArgumentWarning(UserWarning):
    """A `TrainingArguments` field was set to a non-default value that the chosen hf-clinic optimizer does not use."""


# `TrainingArguments` fields that mean the same thing to an optimizer: (constructor kwarg, index in a tuple kwarg).
# LARS's momentum is heavy-ball momentum and its eps sits in the trust-ratio denominator: neither is Adam's.
_ADAM_FIELDS = {"adam_beta1": ("betas", 0), "adam_beta2": ("betas", 1), "adam_epsilon": ("eps", None)}
_MAPPED_FIELDS: dict[type, dict[str, tuple[str, int | None]]] = {
    RAdam: _ADAM_FIELDS,
    Lamb: _ADAM_FIELDS,
    GeneralizedSignSGD: _ADAM_FIELDS,
    Lars: {},
}
# Constructor kwargs that come from `TrainingArguments` only, with the field to set instead.
_TRAINER_ONLY = {"lr": "learning_rate", "weight_decay": "weight_decay"}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


@dataclass(frozen=True)
class OptimArgKey:
    """One valid `optim_args` key of an optimizer.

    Args:
        key (`str`): The key as written in `optim_args` (`"beta2"`).
        kwarg (`str`): The constructor keyword argument it sets (`"betas"`).
        index (`int`, *optional*): Position inside a tuple keyword argument (1 for `beta2`).
        type (`type`): `bool`, `int`, `float` or `str`.
        optional (`bool`): Whether `none` is accepted.
    """

    key: str
    kwarg: str
    index: int | None
    type: type
    optional: bool

    def describe(self) -> str:
        return f"{self.key} ({self.type.__name__}{' or none' if self.optional else ''})"

    def convert(self, value: str) -> Any:
        lower = value.lower()
        if self.optional and lower in _NONE:
            return None
        if self.type is bool:
            if lower in _TRUE:
                return True
            if lower in _FALSE:
                return False
            raise ValueError("expected true or false")
        if self.type is int:
            return int(value)
        if self.type is float:
            result = float(value)
            if not math.isfinite(result):
                raise ValueError("expected a finite number")
            return result
        if not value:
            raise ValueError("expected a non-empty string")
        return value


def _scalar_type(hint) -> tuple[type, bool] | None:
    """(type, accepts None) for bool/int/float/str hints and their Optional forms; None for anything else."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, UnionType):
        members = [a for a in typing.get_args(hint) if a is not NoneType]
        optional = len(members) < len(typing.get_args(hint))
        if len(members) != 1:
            return None
        hint = members[0]
    return (hint, optional) if hint in (bool, int, float, str) else None


@functools.cache
def _class_keys(optimizer_class: type) -> dict[str, OptimArgKey]:
    """The optim_args keys of an optimizer class, read from its constructor signature and type hints."""
    hints = typing.get_type_hints(optimizer_class.__init__)
    keys: dict[str, OptimArgKey] = {}
    for name in inspect.signature(optimizer_class.__init__).parameters:
        if name in ("self", "params") or name in _TRAINER_ONLY or name not in hints:
            continue
        hint = hints[name]
        if typing.get_origin(hint) is tuple:
            # A tuple cannot be written in optim_args (it is split on ","): one key per element, betas -> beta1, beta2.
            stem = name[:-1] if name.endswith("s") else f"{name}_"
            for i, element in enumerate(typing.get_args(hint)):
                scalar = _scalar_type(element)
                if scalar is not None:
                    keys[f"{stem}{i + 1}"] = OptimArgKey(f"{stem}{i + 1}", name, i, *scalar)
            continue
        scalar = _scalar_type(hint)
        if scalar is not None:
            keys[name] = OptimArgKey(name, name, None, *scalar)
    return keys


def optim_args_keys(name: str) -> dict[str, OptimArgKey]:
    """Every key `optim_args` accepts for the hf-clinic optimizer `name`.

    These are the optimizer's constructor arguments (tuples split into one key per element, e.g. `beta1`, `beta2`),
    except `lr` and `weight_decay`, which come from `TrainingArguments.learning_rate` and `weight_decay`.

    Example:
        ```python
        >>> from hf_clinic.integrations.transformers import optim_args_keys
        >>> sorted(optim_args_keys("radam"))[:4]
        ['beta1', 'beta2', 'decoupled_weight_decay', 'eps']
        ```
    """
    return _class_keys(get_optimizer_info(name).optimizer_class)


def _describe_keys(name: str) -> str:
    return ", ".join(k.describe() for k in optim_args_keys(name).values())


def _split_pairs(name: str, optim_args: str) -> dict[str, str]:
    """Split like transformers' `_parse_optim_args` (spaces removed, ',' then '='), with a useful error."""
    pairs: dict[str, str] = {}
    for piece in optim_args.replace(" ", "").split(","):
        key, sep, value = piece.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"Invalid optim_args {optim_args!r} for optim={name!r}: {piece!r} is not a key=value pair. "
                f"optim_args is a comma-separated list of key=value pairs whose values contain no ',' or '=' "
                f"(write betas as beta1=0.9,beta2=0.98). Valid keys: {_describe_keys(name)}"
            )
        if key in pairs:
            raise ValueError(f"Invalid optim_args {optim_args!r} for optim={name!r}: key {key!r} is given twice")
        pairs[key] = value
    return pairs


def parse_optim_args(name: str, optim_args: str | dict[str, str] | None) -> dict[str, Any]:
    """Parse `TrainingArguments.optim_args` for the hf-clinic optimizer `name` into typed keyword arguments.

    Args:
        name (`str`): An hf-clinic optimizer name (`hf_clinic.list_optimizers()`).
        optim_args (`str` or `dict[str, str]`, *optional*): `"warm_phase=sgd,rectify_threshold=4"`, or the dict of
            strings transformers parsed it into.

    Returns:
        `dict[str, Any]`: Keyword arguments keyed by optim_args key, with Python types (`{"warm_phase": "sgd",
        "rectify_threshold": 4.0}`); tuple elements stay under their own keys (`beta1`, `beta2`).

    Raises:
        `ValueError`: For a malformed pair, an unknown or repeated key, `lr` / `weight_decay` (set them through
            `TrainingArguments`), or a value of the wrong type. The message lists the valid keys.

    Example:
        ```python
        >>> from hf_clinic.integrations.transformers import parse_optim_args
        >>> parse_optim_args("radam", "warm_phase=sgd, rectify_threshold=4")
        {'warm_phase': 'sgd', 'rectify_threshold': 4.0}
        ```
    """
    if not optim_args:
        return {}
    pairs = _split_pairs(name, optim_args) if isinstance(optim_args, str) else dict(optim_args)
    keys = optim_args_keys(name)
    parsed: dict[str, Any] = {}
    for key, value in pairs.items():
        if key in _TRAINER_ONLY:
            raise ValueError(
                f"optim_args key {key!r} is not accepted for optim={name!r}: set TrainingArguments."
                f"{_TRAINER_ONLY[key]} (--{_TRAINER_ONLY[key]}) instead. Valid keys: {_describe_keys(name)}"
            )
        if key not in keys:
            raise ValueError(f"Unknown optim_args key {key!r} for optim={name!r}; valid keys: {_describe_keys(name)}")
        try:
            parsed[key] = keys[key].convert(value)
        except ValueError as err:
            raise ValueError(
                f"Invalid optim_args value {key}={value!r} for optim={name!r}: {err} "
                f"({keys[key].describe()}). Valid keys: {_describe_keys(name)}"
            ) from None
    return parsed


def _optim_name(optim) -> str:
    return getattr(optim, "value", optim)


def _field_is_set(args, field: str) -> bool:
    """Whether a `TrainingArguments` field differs from the default of the arguments' own dataclass."""
    spec = type(args).__dataclass_fields__.get(field)
    return spec is None or getattr(args, field) != spec.default


def trainer_optimizer_kwargs(args, name: str | None = None) -> dict[str, Any]:
    """The constructor keyword arguments the Trainer passes to hf-clinic optimizer `name` (without `params`).

    Precedence, lowest first: the registry entry's defaults (a preset), `TrainingArguments` fields that mean the same
    thing (`adam_beta1/2`, `adam_epsilon` for Adam-style optimizers, when set away from their defaults), then
    `optim_args`. `lr` and `weight_decay` always come from `TrainingArguments`.

    Args:
        args (`transformers.TrainingArguments`): The training arguments.
        name (`str`, *optional*, defaults to `args.optim`): The hf-clinic optimizer name.

    Raises:
        `ValueError`: For bad `optim_args` (see [`parse_optim_args`]) or when `optim_args` and a `TrainingArguments`
            field set the same value differently.
    """
    name = _optim_name(args.optim) if name is None else name
    info = get_optimizer_info(name)
    keys = optim_args_keys(name)
    explicit = parse_optim_args(name, args.optim_args)

    # Values for each (kwarg, index) slot, from TrainingArguments then optim_args.
    slots: dict[tuple[str, int | None], tuple[Any, str]] = {}
    mapped = _MAPPED_FIELDS.get(info.optimizer_class, {})
    for field, slot in mapped.items():
        if _field_is_set(args, field):
            slots[slot] = (getattr(args, field), f"TrainingArguments.{field}")
    unused = [f for f in _ADAM_FIELDS if f not in mapped and _field_is_set(args, f)]
    if unused:
        warnings.warn(
            f"optim={name!r} does not use TrainingArguments {', '.join(unused)} (they are Adam hyperparameters); "
            f"set its own options through optim_args, valid keys: {_describe_keys(name)}",
            IgnoredTrainingArgumentWarning,
            stacklevel=2,
        )
    for key, value in explicit.items():
        slot = (keys[key].kwarg, keys[key].index)
        if slot in slots and slots[slot][0] != value:
            raise ValueError(
                f"optim_args {key}={value} for optim={name!r} conflicts with {slots[slot][1]}="
                f"{slots[slot][0]}; set it in one place"
            )
        slots[slot] = (value, f"optim_args {key}")

    kwargs: dict[str, Any] = dict(info.defaults)
    kwargs["lr"] = args.learning_rate
    kwargs["weight_decay"] = args.weight_decay
    resolved = info.resolved_defaults
    for (kwarg, index), (value, _) in slots.items():
        if index is None:
            kwargs[kwarg] = value
        else:
            current = list(kwargs.get(kwarg, resolved[kwarg]))
            current[index] = value
            kwargs[kwarg] = tuple(current)
    return kwargs


def _split_by_mesh(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give parameters on different DTensor meshes their own groups (as `Trainer.create_optimizer` does)."""
    from transformers.trainer_optimizer import has_mixed_dtensor

    if not has_mixed_dtensor(p for g in groups for p in g["params"]):
        return groups
    from torch.distributed.tensor import DTensor

    split = []
    for group in groups:
        by_mesh: dict[Any, list] = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


def optimizer_handler(ctx) -> tuple[type, dict[str, Any]]:
    """The Trainer's optimizer handler for every hf-clinic name (`transformers.trainer_optimizer` protocol).

    Args:
        ctx (`transformers.trainer_optimizer.OptimizerContext`): The Trainer's arguments and model.

    Returns:
        `(optimizer_class, kwargs)`; `kwargs["params"]` holds `hf_clinic.param_groups(model, args.weight_decay)`,
        which the Trainer uses instead of its own weight-decay groups.

    Raises:
        `ValueError`: For bad `optim_args`.
        `NotImplementedError`: Under a sharded backend the optimizer cannot do right (FSDP1, DeepSpeed ZeRO-3, and
            ZeRO-1/2 for LAMB/LARS); see `hf_clinic.integrations.accelerate`.
    """
    name = _optim_name(ctx.args.optim)
    info = get_optimizer_info(name)
    check_sharding_support(info.optimizer_class, model=ctx.model, args=ctx.args)
    kwargs = trainer_optimizer_kwargs(ctx.args, name)
    if ctx.model is not None:
        kwargs["params"] = _split_by_mesh(param_groups(ctx.model, ctx.args.weight_decay))
    return info.optimizer_class, kwargs


def validate_training_args(args) -> None:
    """Check the optimizer settings of `TrainingArguments` that name an hf-clinic optimizer; no-op otherwise.

    Builds the optimizer once on a dummy parameter, so every value the optimizer itself would reject (a negative
    learning rate, an unknown `warm_phase`, ...) fails here, with the optimizer's own message.

    Raises:
        `ValueError`: For bad `optim_args` or an invalid hyperparameter.
    """
    name = _optim_name(args.optim)
    if name not in _REGISTERED:
        return
    info = get_optimizer_info(name)
    dummy = [{"params": [torch.zeros(2, 2, requires_grad=True)], "weight_decay": args.weight_decay}]
    with warnings.catch_warnings():
        # Advice (LAMB's weight-decay warning, unused Adam fields) is given once, when the Trainer builds the optimizer.
        warnings.simplefilter("ignore")
        kwargs = trainer_optimizer_kwargs(args, name)
        try:
            info.optimizer_class(dummy, **kwargs)
        except ValueError as err:
            raise ValueError(f"TrainingArguments(optim={name!r}, optim_args={args.optim_args!r}): {err}") from err


# Names this module registered, in registry order.
_REGISTERED: list[str] = []


def trainer_optimizer_names() -> list[str]:
    """The hf-clinic names `TrainingArguments.optim` accepts in this process."""
    return list(_REGISTERED)


def _install_validation() -> None:
    from transformers import Trainer, TrainingArguments

    post_init = TrainingArguments.__post_init__
    if not getattr(post_init, "_hf_clinic_wrapped", False):

        @functools.wraps(post_init)
        def __post_init__(self):
            post_init(self)
            validate_training_args(self)

        __post_init__._hf_clinic_wrapped = True
        TrainingArguments.__post_init__ = __post_init__

    get_cls_and_kwargs = Trainer.get_optimizer_cls_and_kwargs  # a staticmethod: a plain function here
    if not getattr(get_cls_and_kwargs, "_hf_clinic_wrapped", False):

        @functools.wraps(get_cls_and_kwargs)
        def get_optimizer_cls_and_kwargs(args, model=None):
            name = _optim_name(args.optim)
            if name in _REGISTERED:
                parse_optim_args(name, args.optim_args)  # before transformers' own split fails without a message
            return get_cls_and_kwargs(args, model)

        get_optimizer_cls_and_kwargs._hf_clinic_wrapped = True
        Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def register_trainer_optimizers() -> list[str]:
    """Register every name of `hf_clinic.OPTIMIZERS` with `TrainingArguments.optim` and the Trainer. Idempotent.

    A name transformers already defines (e.g. a future built-in `lamb`) is never overridden: it is skipped with a
    `NameCollisionWarning`, and `hf_clinic.create_optimizer(model, name)` remains the way to get hf-clinic's version.

    Returns:
        `list[str]`: The hf-clinic names `TrainingArguments.optim` accepts.

    Raises:
        `ImportError`: When the transformers internals the registration relies on are missing (a transformers version
            outside `>=5.23,<6`).
    """
    from transformers import Trainer, TrainingArguments

    _internals()  # ImportError naming the missing transformers internals and the supported range
    for owner, attribute in ((TrainingArguments, "__post_init__"), (Trainer, "get_optimizer_cls_and_kwargs")):
        if not callable(getattr(owner, attribute, None)):
            raise ImportError(
                f"hf_clinic needs transformers.{owner.__name__}.{attribute}, which transformers "
                f"{transformers.__version__} does not have; hf_clinic supports transformers{SUPPORTED_TRANSFORMERS}."
            )
    for name in OPTIMIZERS:
        if name in _REGISTERED:
            continue
        try:
            register_optimizer_name(name, optimizer_handler)
        except ValueError as err:
            warnings.warn(
                f"{err} TrainingArguments(optim={name!r}) keeps transformers' optimizer; use "
                f"hf_clinic.create_optimizer(model, {name!r}) with Trainer(optimizers=(optimizer, None)) for "
                f"hf-clinic's.",
                NameCollisionWarning,
                stacklevel=2,
            )
            continue
        _REGISTERED.append(name)
    _install_validation()
    return trainer_optimizer_names()


register_trainer_optimizers()
