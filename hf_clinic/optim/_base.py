"""Shared machinery of the hf-clinic optimizers: validation, state, implementation selection, telemetry plumbing.

Every optimizer in `hf_clinic.optim` is a thin `torch.optim.Optimizer` subclass (validation, defaults, lazy state)
over a functional kernel with three implementations:

- `forloop`: `_single_tensor_<name>`, the readable, float64-checkable ground truth;
- `foreach`: `_multi_tensor_<name>`, the same maths with `torch._foreach_*` ops, grouped by device and dtype;
- `fused`: compiled per-tensor kernels for large tensors (see `hf_clinic.optim._fused`), foreach for the rest.

State policy: optimizer state (moments, momentum buffers) is float32 for bfloat16/float16 parameters and the
parameter dtype otherwise; the per-parameter step is a 0-d float32 CPU tensor `state["step"]`, as in torch.

NOTE: `torch.optim.Optimizer.load_state_dict` casts floating state to the parameter dtype (and moves `step` to the
parameter device when a group has `fused=True`). The load hooks installed here undo both, so float32 state of
bfloat16 parameters survives a checkpoint round trip bit-exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices


__all__ = [
    "LOW_PRECISION_DTYPES",
    "ClinicOptimizer",
    "check_betas",
    "check_choice",
    "check_lr",
    "check_nonnegative",
    "group_by_device_and_dtype",
    "record_explicit_kwargs",
    "state_dtype_for",
]

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

# Group key that switches layer adaptation (LAMB/LARS trust ratio) off for a group, whatever `adapt` says.
# `hf_clinic.param_groups` sets it to False on the no-decay group (biases, norm gains, Admin's omega).
LAYER_ADAPTATION_KEY = "layer_adaptation"


def state_dtype_for(param: Tensor) -> torch.dtype:
    """The dtype of optimizer state for `param`: float32 for bfloat16/float16 parameters, else the param dtype."""
    return torch.float32 if param.dtype in LOW_PRECISION_DTYPES else param.dtype


# ------------------------------------------------------------------------------------------------ validation


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        raise ValueError(f"Invalid learning rate: {lr!r}; hf-clinic optimizers take a Python float lr")
    if not _is_real_number(lr) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(name: str, value: Any, *, allow_none: bool = False, strictly_positive: bool = False) -> None:
    if value is None and allow_none:
        return
    bad = not _is_real_number(value) or not math.isfinite(value) or value < 0.0
    if strictly_positive and not bad:
        bad = value <= 0.0
    if bad:
        raise ValueError(f"Invalid {name} value: {value}")


def check_betas(betas: Any, *, num_betas: int = 2) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != num_betas:
        raise ValueError(f"Invalid betas: {betas!r}; expected a tuple of {num_betas} floats in [0, 1)")
    for i, beta in enumerate(betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r}; valid values: {valid}")


def record_explicit_kwargs(init: Callable) -> Callable:
    """Decorate `__init__` to record which keyword arguments the caller passed explicitly.

    The names land in `self._explicit_kwargs` before `__init__` runs, so presets can fill in only what the caller
    left at its documented default (explicit kwargs override a preset).
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        self._explicit_kwargs = frozenset(bound.arguments) - {"self", "params"}
        return init(self, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------------ helpers


def group_by_device_and_dtype(params: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of `params` grouped by (device, dtype), in first-seen order (foreach ops need uniform lists)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return groups


def _foreach_supported(params: Iterable[Tensor]) -> bool:
    supported = _get_foreach_kernels_supported_devices() + ["cpu"]
    return all(p.device.type in supported and not torch.is_complex(p) for p in params)


# ------------------------------------------------------------------------------------------------ base class


class ClinicOptimizer(Optimizer):
    """Base class: implementation selection, lazy fp32-aware state, dtype-preserving load, telemetry storage.

    Subclasses set `_state_buffers` (names of the per-parameter state tensors besides `step`), `_algorithm` (a
    short name used in messages and telemetry keys), implement `_validate_group(group)` and `step`.
    """

    _state_buffers: tuple[str, ...] = ()
    _algorithm: str = "optimizer"

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        *,
        foreach: bool | None,
        fused: bool | None,
        maximize: bool,
        telemetry: bool,
    ) -> None:
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value not in (None, True, False):
                raise ValueError(f"Invalid {name}: {value!r}; valid values: None, True, False")
        if foreach and fused:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize: {maximize!r}; expected a bool")
        if not isinstance(telemetry, bool):
            raise ValueError(f"Invalid telemetry: {telemetry!r}; expected a bool")
        self._validate_group(defaults)
        # `differentiable` is always False (torch's __setstate__ would add it on unpickling otherwise)
        defaults = dict(defaults, foreach=foreach, fused=fused, maximize=maximize, differentiable=False)
        self._telemetry_enabled = telemetry
        self._telemetry_data: dict[str, Any] | None = None
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(_stash_saved_state)
        self.register_load_state_dict_post_hook(_restore_saved_state)

    # -- validation ----------------------------------------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        self._validate_group(group)

    # -- state ---------------------------------------------------------------------------------------------------

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """Params with a grad, their grads and their (lazily created) state dicts; params without grad are skipped."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                dtype = state_dtype_for(p)
                for name in self._state_buffer_names(group):
                    state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states

    def _state_buffer_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_buffers

    def _implementation(self, group: dict[str, Any], params: Sequence[Tensor]) -> str:
        """'forloop', 'foreach' or 'fused' for this group (see the class docstrings for what None means)."""
        if group["fused"]:
            return "fused"
        if group["foreach"] is not None:
            return "foreach" if group["foreach"] else "forloop"
        if group["fused"] is None and self._fused_by_default(params):
            return "fused"
        return "foreach" if _foreach_supported(params) else "forloop"

    def _fused_by_default(self, params: Sequence[Tensor]) -> bool:
        from ._fused import fused_by_default

        return fused_by_default(params)

    # -- telemetry -----------------------------------------------------------------------------------------------

    def telemetry(self) -> dict[str, float]:
        """The latest step's diagnostics as plain floats; `{}` when telemetry is off or before the first step."""
        if not self._telemetry_enabled or self._telemetry_data is None:
            return {}
        return self._summarize_telemetry(self._telemetry_data)

    def _summarize_telemetry(self, data: dict[str, Any]) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_telemetry_enabled", True)
        self.__dict__.setdefault("_telemetry_data", None)


def trust_ratio_summary(prefix: str, ratios: list[Tensor]) -> dict[str, float]:
    """min / median / max of the per-tensor trust ratios of one step (one host transfer, at call time only)."""
    if not ratios:
        return {}
    flat = torch.cat([r.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for r in ratios])
    # torch.median returns the lower of the two middle values; use the usual midpoint definition instead.
    median = torch.quantile(flat, 0.5).item()
    return {
        f"{prefix}/trust_ratio_min": flat.min().item(),
        f"{prefix}/trust_ratio_median": median,
        f"{prefix}/trust_ratio_max": flat.max().item(),
    }


# ------------------------------------------------------------------------------------------------ load hooks


def _stash_saved_state(optimizer: ClinicOptimizer, state_dict: dict[str, Any]) -> None:
    """Keep the saved state tensors, keyed by our params, before torch casts them to the param dtype."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_state = state_dict["state"]
    optimizer._stashed_state = [
        (p, dict(saved_state[i])) for i, p in zip(saved_ids, params, strict=False) if i in saved_state
    ]


def _restore_saved_state(optimizer: ClinicOptimizer) -> None:
    stashed = optimizer.__dict__.pop("_stashed_state", [])
    for p, saved in stashed:
        state = optimizer.state[p]
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                continue
            if key == "step":
                state[key] = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
            elif value.is_floating_point():
                state[key] = value.detach().to(device=p.device, dtype=state_dtype_for(p), copy=True)
