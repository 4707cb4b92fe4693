"""Adding hf-clinic's names to `TrainingArguments.optim` and `TrainingArguments.lr_scheduler_type`.

transformers 5.x has no plugin registry for optimizers or schedulers (maintainers declined one in
huggingface/transformers#1302 and #33712). `TrainingArguments.__post_init__` converts `optim` with
`OptimizerNames(value)` and `lr_scheduler_type` with `SchedulerType(value)`, `HfArgumentParser` lists the enum
members as argparse choices, and the Trainer dispatches through two module-level dicts:
`trainer_optimizer._OPTIMIZER_HANDLERS` and `optimization.TYPE_TO_SCHEDULER_FUNCTION`.

A name therefore needs two things: an enum member, and an entry in the dispatch dict. This module adds both, in
place, idempotently, and never touches a name transformers already defines.

Members added here pickle as plain strings, so a checkpoint's `training_args.bin` that mentions `optim="radam"` still
unpickles in a Python process that never imported hf_clinic.
"""

import enum
from collections.abc import Callable
from typing import Any

import transformers


__all__ = ["added_names", "extend_str_enum", "register_optimizer_name", "register_scheduler_name"]

SUPPORTED_TRANSFORMERS = ">=5.23,<6"

# Values this module added, per enum class; used for idempotence and to tell ours from built-ins.
_ADDED: dict[type, dict[str, enum.Enum]] = {}


def _internals():
    """Return the four transformers objects name registration relies on, or fail with a clear message."""
    try:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames
    except ImportError as err:
        raise ImportError(
            f"hf_clinic registers optimizer and scheduler names through transformers internals "
            f"(OptimizerNames, SchedulerType, trainer_optimizer._OPTIMIZER_HANDLERS, "
            f"optimization.TYPE_TO_SCHEDULER_FUNCTION) that transformers {transformers.__version__} does not have: "
            f"{err}. hf_clinic supports transformers{SUPPORTED_TRANSFORMERS}. Pass optimizers by object "
            f"(`Trainer(optimizer_cls_and_kwargs=...)`) or install a supported transformers version."
        ) from err
    return OptimizerNames, _OPTIMIZER_HANDLERS, SchedulerType, TYPE_TO_SCHEDULER_FUNCTION


def _pickle_as_str(value: str):
    def __reduce_ex__(protocol):
        return (str, (value,))

    return __reduce_ex__


def extend_str_enum(enum_cls: type[enum.Enum], member_name: str, value: str) -> enum.Enum:
    """Add a member to a `(str, Enum)` class at run time, or return the member hf_clinic added before.

    Python has no public API for this, so the member is built the way `EnumType` builds members and attached to
    the class's lookup tables. Lookup by value, by name and by attribute, iteration, `in`, hashing, JSON and argparse
    choices all behave as for a built-in member.

    Args:
        enum_cls (`type[enum.Enum]`): A `str`-mixin enum such as `transformers.training_args.OptimizerNames`.
        member_name (`str`): The attribute name, e.g. `"RADAM"`.
        value (`str`): The user-facing value, e.g. `"radam"`.

    Raises:
        `ValueError`: If `value` or `member_name` already belongs to a member that hf_clinic did not add.
    """
    ours = _ADDED.setdefault(enum_cls, {})
    if value in ours:
        return ours[value]
    if value in enum_cls._value2member_map_:
        raise ValueError(
            f"{value!r} is already a built-in {enum_cls.__name__} value in transformers {transformers.__version__}; "
            f"hf_clinic never overrides built-in names."
        )
    if member_name in enum_cls._member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member named {member_name!r}.")

    member = str.__new__(enum_cls, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Pickle as the plain string so artifacts stay loadable without hf_clinic; str equality and hashing make
    # the plain string interchangeable with the member everywhere transformers compares or looks it up.
    member.__reduce_ex__ = _pickle_as_str(value)

    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13
    if add_member is not None:
        add_member(member_name, member)
    else:
        type.__setattr__(enum_cls, member_name, member)
        enum_cls._member_map_[member_name] = member
        enum_cls._member_names_.append(member_name)
    enum_cls._value2member_map_[value] = member
    ours[value] = member
    return member


def register_optimizer_name(name: str, handler: Callable[[Any], tuple[Any, dict]]) -> enum.Enum:
    """Make `TrainingArguments(optim=name)` and `--optim name` resolve through `handler`.

    Args:
        name (`str`): The lower-case optimizer name.
        handler (`Callable`): A transformers optimizer handler: takes a `transformers.trainer_optimizer.
            OptimizerContext` and returns `(optimizer_cls_or_factory, kwargs)`.

    Returns:
        The `OptimizerNames` member for `name`.
    """
    optimizer_names, handlers, _, _ = _internals()
    member = extend_str_enum(optimizer_names, name.upper(), name)
    handlers[member] = handler  # mutate in place: trainer.py imported this dict object by name
    return member


def register_scheduler_name(name: str, factory: Callable[..., Any]) -> enum.Enum:
    """Make `TrainingArguments(lr_scheduler_type=name)` and `--lr_scheduler_type name` build `factory`.

    `transformers.get_scheduler` calls factories of names it has no special case for as
    `factory(optimizer, num_warmup_steps=..., num_training_steps=..., **lr_scheduler_kwargs)`.

    Returns:
        The `SchedulerType` member for `name`.
    """
    _, _, scheduler_type, type_to_function = _internals()
    member = extend_str_enum(scheduler_type, name.upper(), name)
    type_to_function[member] = factory
    return member


def added_names(enum_cls: type[enum.Enum]) -> list[str]:
    """The values hf_clinic has added to `enum_cls`, in registration order."""
    return list(_ADDED.get(enum_cls, {}))
