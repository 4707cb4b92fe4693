"""The clipping-aware schedule: one decision per optimizer step, from the pre-clip norm and the scheduled lr.

[`ClipAwareSchedule`] runs once per optimizer step, after the gradients are final (accumulated, all-reduced and
unscaled) and before `optimizer.step()`. It computes the pre-clip global L2 norm G_t, reads the scheduled learning
rate eta_t from the optimizer, asks its [`ClipPolicy`] for the threshold c_t and then either

* clips the gradients by min(1, c_t / (G_t + 1e-6)) (`apply_to="grad"`, bit-identical to
  `torch.nn.utils.clip_grad_norm_` at max_norm = c_t), or
* scales this step's learning rate by s_t = that coefficient (`apply_to="lr"`; the step-length form that also
  bounds Adam-family steps), restoring every group's lr right after `optimizer.step()` so that chainable schedulers
  that multiply the current lr never see the scaled value, or
* skips the step when G_t is not finite: every gradient is set to `None`, so `optimizer.step()` changes neither the
  parameters nor the optimizer state (torch optimizers skip parameters without gradients); the step is counted.

Where it runs. There are two entry points, sharing this object:

1. **Plain loops (one call).** `schedule.clip_(model, optimizer, accelerator)` between `backward` and
   `optimizer.step()`, in place of `accelerator.clip_grad_norm_`. It unscales through the accelerator (once: a
   second `accelerator.clip_grad_norm_` in the same step returns the cached norm instead of unscaling again, which
   would raise with a GradScaler), does nothing on gradient-accumulation micro-steps, and returns [`ClipStats`].
2. **Attached** (`schedule.attach(optimizer, model)`; used by [`ClipAwareCallback`], [`ClipAwareLR`] and
   [`LocalGradientClipping`]). The schedule then *takes over* every `Accelerator.clip_grad_norm_` call made for
   that optimizer (the Trainer's clipping included: its `max_grad_norm` is replaced by the policy, and the Trainer
   still logs the pre-clip norm it gets back), and, as a fallback for loops that never call it, observes the step
   in an optimizer step pre-hook (by then Accelerate's GradScaler has unscaled the gradients).
   `Accelerator.clip_grad_norm_` is wrapped once, at class level, and passes through untouched for accelerators
   whose optimizers have no schedule attached.

A step is observed at most once: the schedule remembers the gradient tensor (and its version counter) of one
parameter, so the interception, the explicit call and the pre-hook never clip twice. (In pre-hook mode, a loop that
edits that gradient in place between the clip call and `optimizer.step()` makes it look new and observed again.)

The learning rate read is `param_groups[0]["lr"]`, the value the base scheduler set for this step (schedulers step
after the optimizer). One `.item()` per step moves G_t to the host; policies keep plain Python floats so that their
state is exact, JSON-serialisable and loadable with `torch.load(weights_only=True)`.

NOTE: under data parallelism every process sees the same all-reduced gradients and takes the same decision; under
local SGD ([`LocalGradientClipping`]) each process clips its own local gradient, which is the CELGC algorithm.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer

from .policies import ClipPolicy, get_clip_policy


__all__ = ["ClipAwareSchedule", "ClipStats", "check_clip_backend", "unwrap_accelerated_optimizer"]

_SKIPPED = object()

# inner torch optimizer -> weak reference to the schedule attached to it. Both ends are weak: the optimizer's step
# hooks keep the schedule alive exactly as long as the optimizer.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attached_to(optimizer) -> ClipAwareSchedule | None:
    ref = _ATTACHED.get(optimizer)
    return ref() if ref is not None else None


_UNSUPPORTED = {
    "DEEPSPEED": (
        "DeepSpeed keeps the gradients inside its engine and clips them there (ZeRO partitions them), so a "
        "clip-aware schedule cannot see or change them before the step. Use DeepSpeed's own `gradient_clipping`, "
        "or train with DDP."
    ),
    "FSDP": "FSDP shards the gradients; clip-aware schedules support single-process and DDP training only.",
    "XLA": "XLA is not supported by clip-aware schedules; they support single-process and DDP training only.",
    "MEGATRON_LM": "Megatron-LM clips inside its own optimizer; clip-aware schedules support single-process and DDP.",
}


def check_clip_backend(distributed_type, who: str = "ClipAwareSchedule") -> None:
    """Raise `NotImplementedError` for Accelerate backends whose gradients a clip-aware schedule cannot reach."""
    name = getattr(distributed_type, "name", str(distributed_type))
    if name in _UNSUPPORTED:
        raise NotImplementedError(f"{who} does not support distributed_type={name}: {_UNSUPPORTED[name]}")


def unwrap_accelerated_optimizer(optimizer):
    """The torch optimizer under Accelerate's `AcceleratedOptimizer` wrapper(s)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


@dataclass(frozen=True)
class ClipStats:
    """What the schedule decided for one optimizer step.

    Args:
        grad_norm (`float`): The pre-clip global L2 norm G_t (may be inf/nan on a skipped step).
        threshold (`float`): The clip threshold c_t (`inf`: no clipping; `nan`: skipped step or unit-wise policy).
        coef (`float`): The clip coefficient min(1, c_t / (G_t + 1e-6)) (unit-wise: post/pre global norm; 0 when
            skipped), whether it was applied to the gradients or to the learning rate.
        lr (`float`): The scheduled learning rate eta_t of the first parameter group.
        lr_scale (`float`): The factor s_t applied to every group's lr for this step (1 unless `apply_to="lr"`).
        effective_lr (`float`): The SGD-equivalent step size eta_t * coef (0 when skipped).
        clipped (`bool`): Whether G_t exceeded c_t (unit-wise: whether any unit was clipped).
        skipped (`bool`): Whether the step was skipped because G_t was not finite.
    """

    grad_norm: float
    threshold: float
    coef: float
    lr: float
    lr_scale: float
    effective_lr: float
    clipped: bool
    skipped: bool


class ClipAwareSchedule:
    """A clipping-aware schedule: a [`ClipPolicy`] applied once per optimizer step, with telemetry and state.

    Args:
        policy (`str` or [`ClipPolicy`], *optional*, defaults to `"fixed"`): A policy object or one of
            `hf_clinic.clipping.list_clip_policies()`: `fixed`, `step_length`, `percentile`, `zscore`, `unitwise`.
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` multiplies the gradients by the clip
            coefficient; `"lr"` multiplies this step's learning rate instead (not for `unitwise`).
        policy_kwargs: Constructor arguments of the named policy.

    Example (plain Accelerate loop; the one call replaces `accelerator.clip_grad_norm_`):

    ```python
    >>> schedule = ClipAwareSchedule("zscore", z_thresh=2.5)
    >>> for batch in dataloader:
    ...     with accelerator.accumulate(model):
    ...         accelerator.backward(model(**batch).loss)
    ...         schedule.clip_(model, optimizer, accelerator)  # no-op on accumulation micro-steps
    ...         optimizer.step()
    ...         lr_scheduler.step()
    ...         optimizer.zero_grad()
    ...     accelerator.log(schedule.metrics())  # clip/grad_norm, clip/threshold, clip/rate, ...
    ```
    """

    def __init__(self, policy: str | ClipPolicy = "fixed", *, apply_to: str = "grad", **policy_kwargs):
        self.policy = get_clip_policy(policy, **policy_kwargs)
        if apply_to not in ("grad", "lr"):
            raise ValueError(f"Invalid apply_to: {apply_to!r}; valid values: 'grad', 'lr'")
        if apply_to == "lr" and self.policy.unitwise:
            raise ValueError(f"apply_to='lr' needs a global threshold; {self.policy.name!r} clips per unit.")
        self.apply_to = apply_to
        self.num_steps = 0  # finite steps observed
        self.num_clipped = 0
        self.num_skipped = 0
        self.last: ClipStats | None = None
        self._interval = [0, 0, 0, 0]  # steps, clipped steps, units clipped, units seen since the last metrics()
        self._optimizer = None
        self._hooks: list = []
        self._names: dict[int, str] = {}
        self._pending_lrs: list[tuple[dict, Any]] = []
        self._token = None
        self._last_norm: torch.Tensor | None = None
        self._observe_in_step = True

    # ---- wiring -------------------------------------------------------------------------------------------------

    def attach(self, optimizer, model: torch.nn.Module | None = None, *, observe_in_step: bool = True):
        """Take over clipping for `optimizer`: its `Accelerator.clip_grad_norm_` calls and (optionally) its steps.

        Args:
            optimizer (`torch.optim.Optimizer`): The optimizer, possibly wrapped by Accelerate.
            model (`torch.nn.Module`, *optional*): Gives parameter names (needed by `unitwise` to exclude the head).
            observe_in_step (`bool`, *optional*, defaults to `True`): Also observe steps that reach
                `optimizer.step()` without a clip call (a step pre-hook).

        Returns:
            `self`.

        Raises:
            `RuntimeError`: If another schedule is attached to this optimizer, or this one to another optimizer.
        """
        inner = unwrap_accelerated_optimizer(optimizer)
        owner = _attached_to(inner)
        if owner is not None and owner is not self:
            raise RuntimeError(
                f"This optimizer already has a clip-aware schedule attached ({owner.policy!r}); only one schedule "
                f"can clip an optimizer (e.g. do not combine ClipAwareCallback with a clip-aware lr_scheduler_type)."
            )
        if self._optimizer is not None and self._optimizer is not inner:
            raise RuntimeError("This ClipAwareSchedule is attached to another optimizer; call detach() first.")
        if model is not None:
            self._names = {id(p): name for name, p in model.named_parameters()}
        if self.policy.unitwise and not self._names:
            raise ValueError("The 'unitwise' policy needs the model to exclude its final classifier by name.")
        if self._optimizer is None:
            if (
                self.policy.name == "step_length"
                and self.apply_to == "grad"
                and "adam" in type(inner).__name__.lower()
            ):
                warnings.warn(
                    f"The step_length policy bounds the step of SGD-type optimizers; {type(inner).__name__} "
                    f"normalises the gradient, so clipping it does not bound the step. Use apply_to='lr'.",
                    UserWarning,
                    stacklevel=3,
                )
            _ATTACHED[inner] = weakref.ref(self)
            self._optimizer = inner
            self._hooks = [
                inner.register_step_pre_hook(self._pre_step),
                inner.register_step_post_hook(self._post_step),
            ]
            _install_accelerator_hook()
        self._observe_in_step = observe_in_step
        return self

    def detach(self) -> None:
        """Undo [`ClipAwareSchedule.attach`]. Idempotent."""
        self._restore_lrs()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._optimizer is not None and _attached_to(self._optimizer) is self:
            del _ATTACHED[self._optimizer]
        self._optimizer = None

    @property
    def attached(self) -> bool:
        return self._optimizer is not None

    # ---- the one call -------------------------------------------------------------------------------------------

    def clip_(self, model_or_params, optimizer, accelerator=None) -> ClipStats | None:
        """Apply the policy to this step's gradients; call between `backward` and `optimizer.step()`.

        Args:
            model_or_params (`torch.nn.Module` or iterable of `torch.Tensor`): Whose gradients to clip. Pass the
                model for the `unitwise` policy (it needs parameter names).
            optimizer (`torch.optim.Optimizer`): The optimizer about to step (its lr is read and, with
                `apply_to="lr"`, scaled for this step); the schedule attaches to it on first use.
            accelerator (`accelerate.Accelerator`, *optional*): Unscales fp16 gradients once, and makes the call a
                no-op on gradient-accumulation micro-steps.

        Returns:
            [`ClipStats`] for this step, or `None` on a micro-step or when no parameter has a gradient.
        """
        if accelerator is not None and not accelerator.sync_gradients:
            return None
        model = model_or_params if isinstance(model_or_params, torch.nn.Module) else None
        params = list(model.parameters() if model is not None else model_or_params)
        if self._optimizer is not unwrap_accelerated_optimizer(optimizer) or (model is not None and not self._names):
            self.attach(optimizer, model, observe_in_step=self._observe_in_step)
        if self._already_observed():
            return self.last
        if accelerator is not None:
            check_clip_backend(accelerator.distributed_type)
            accelerator.unscale_gradients()
        return self.last if self._observe(params) is not None else None

    # ---- telemetry and state ------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The latest step's `clip/*` values, the clip rate since the previous call, and the skipped-step count."""
        out: dict[str, float] = {}
        last = self.last
        if last is not None:
            out["clip/grad_norm"] = last.grad_norm
            if not self.policy.unitwise:
                out["clip/threshold"] = last.threshold
            out["clip/coef"] = last.coef
            out["clip/effective_lr"] = last.effective_lr
            if self.apply_to == "lr":
                out["clip/lr_scale"] = last.lr_scale
        steps, clipped, units_clipped, units_total = self._interval
        if steps:
            out["clip/rate"] = clipped / steps
        if units_total:
            out["clip/unit_rate"] = units_clipped / units_total
        out["clip/skipped"] = float(self.num_skipped)
        self._interval = [0, 0, 0, 0]
        return out

    def state_dict(self) -> dict:
        """Plain-Python state (policy history/EMAs, counters, latest stats): JSON- and `weights_only`-safe."""
        return {
            "policy": self.policy.name,
            "policy_state": self.policy.state_dict(),
            "counts": [self.num_steps, self.num_clipped, self.num_skipped],
            "interval": list(self._interval),
            "last": asdict(self.last) if self.last is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("policy") != self.policy.name:
            raise ValueError(
                f"Cannot load the state of clip policy {state.get('policy')!r} into a {self.policy.name!r} schedule."
            )
        self.policy.load_state_dict(state.get("policy_state", {}))
        self.num_steps, self.num_clipped, self.num_skipped = (int(x) for x in state.get("counts", (0, 0, 0)))
        self._interval = [int(x) for x in state.get("interval", (0, 0, 0, 0))]
        last = state.get("last")
        self.last = ClipStats(**last) if last is not None else None

    def __repr__(self) -> str:
        return f"ClipAwareSchedule({self.policy!r}, apply_to={self.apply_to!r})"

    # ---- internals ----------------------------------------------------------------------------------------------

    def _already_observed(self) -> bool:
        """Whether the gradients currently held were already observed (same tensor, same version counter)."""
        token = self._token
        if token is None:
            return False
        param_ref, grad_ref, version = token
        param = param_ref()
        if param is None:
            return False
        grad = param.grad
        if grad_ref is _SKIPPED:
            return grad is None
        return grad is not None and grad is grad_ref() and grad._version == version

    def _observe(self, params) -> torch.Tensor | None:
        self._restore_lrs()
        params = [p for p in params if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        grad_norm = float(norm)
        group = self._optimizer.param_groups[0]
        lr = float(group["lr"])
        base_lr = float(group.get("initial_lr", lr))
        self._last_norm = norm

        if not math.isfinite(grad_norm):
            for p in params:
                p.grad = None
            self.num_skipped += 1
            self.last = ClipStats(grad_norm, math.nan, 0.0, lr, 0.0, 0.0, False, True)
            self._token = (weakref.ref(params[0]), _SKIPPED, None)
            return norm

        lr_scale = 1.0
        if self.policy.unitwise:
            named = [(self._names.get(id(p), ""), p) for p in params]
            coef, units_clipped, units_total = self.policy.clip_units_(named, grad_norm)
            threshold = math.nan
            clipped = units_clipped > 0
            self._interval[2] += units_clipped
            self._interval[3] += units_total
        else:
            threshold = float(self.policy.threshold(grad_norm, lr=lr, base_lr=base_lr))
            coef = min(1.0, threshold / (grad_norm + 1e-6))
            # Counted as clipped when the norm exceeds the threshold; the coefficient is torch's, so G = c (e.g. the
            # first AutoClip step) is scaled by c / (c + 1e-6) exactly as clip_grad_norm_ would, but not counted.
            clipped = grad_norm > threshold
            if self.apply_to == "grad":
                # Whenever torch's float32 coefficient could be below 1, let torch compute and apply it (bit-identical
                # to clip_grad_norm_); otherwise skip its multiply-by-one.
                if threshold < (grad_norm + 1e-6) * (1 + 1e-6):
                    torch.nn.utils.clip_grads_with_norm_(params, threshold, norm)
            elif coef < 1.0:
                lr_scale = coef
                for g in self._optimizer.param_groups:
                    self._pending_lrs.append((g, g["lr"]))
                    g["lr"] = g["lr"] * coef

        self.num_steps += 1
        self.num_clipped += int(clipped)
        self._interval[0] += 1
        self._interval[1] += int(clipped)
        self.last = ClipStats(grad_norm, threshold, coef, lr, lr_scale, lr * coef, clipped, False)
        self._token = (weakref.ref(params[0]), weakref.ref(grads[0]), grads[0]._version)
        return norm

    def _restore_lrs(self) -> None:
        for group, lr in self._pending_lrs:
            group["lr"] = lr
        self._pending_lrs = []

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self._observe_in_step and not self._already_observed():
            self._observe([p for group in optimizer.param_groups for p in group["params"]])

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._restore_lrs()

    def _clip_for_accelerator(self, accelerator, parameters, norm_type) -> torch.Tensor:
        if float(norm_type) != 2.0:
            raise ValueError(f"Clip-aware schedules clip the L2 norm; got norm_type={norm_type!r}")
        params = list(parameters)
        if self._already_observed():
            return self._last_norm
        check_clip_backend(accelerator.distributed_type)
        accelerator.unscale_gradients()
        norm = self._observe(params)
        return norm if norm is not None else torch.zeros(())


def _attached_schedule(accelerator) -> ClipAwareSchedule | None:
    for optimizer in getattr(accelerator, "_optimizers", ()):
        schedule = _attached_to(unwrap_accelerated_optimizer(optimizer))
        if schedule is not None:
            return schedule
    return None


def _install_accelerator_hook() -> None:
    """Route `Accelerator.clip_grad_norm_` to the schedule attached to the accelerator's optimizer. Idempotent."""
    from accelerate import Accelerator

    original = Accelerator.clip_grad_norm_
    if getattr(original, "_hf_clinic_wrapped", False):
        return

    @functools.wraps(original)
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        schedule = _attached_schedule(self)
        if schedule is None:
            return original(self, parameters, max_norm, norm_type=norm_type)
        return schedule._clip_for_accelerator(self, parameters, norm_type)

    clip_grad_norm_._hf_clinic_wrapped = True
    Accelerator.clip_grad_norm_ = clip_grad_norm_
