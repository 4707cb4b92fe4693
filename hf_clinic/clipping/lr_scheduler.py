"""Clip-aware learning-rate schedulers, and the `lr_scheduler_type` names that build them.

Some clip policies are schedules in their own right: with SGD, clipping at gamma / eta_t turns the scheduled lr into the
step size min(eta_t, gamma / ||g_t||). [`ClipAwareLR`] pairs any base scheduler with a [`ClipAwareSchedule`], so a
clip policy can be chosen where the schedule is chosen, including from `TrainingArguments` and the command line:

```bash
python train.py --lr_scheduler_type clip_step_length --lr_scheduler_kwargs '{"gamma": 0.05, "base_scheduler": "cosine"}'
python train.py --lr_scheduler_type clip_aware --lr_scheduler_kwargs '{"clip_policy": "zscore", "z_thresh": 3.0}'
```

`ClipAwareLR` steps, reports and saves the base scheduler unchanged and adds the clip schedule's state to its
`state_dict` (so `scheduler.pt` makes resume exact). It attaches the schedule to the optimizer: the Trainer's
`accelerator.clip_grad_norm_` call is taken over by the policy (its `max_grad_norm` is ignored), and loops that
never clip are observed in an optimizer step pre-hook. It also extends the optimizer's `telemetry()` with the
`clip/*` metrics, which is how they reach the Trainer's logs without a callback.

NOTE: under `accelerator.prepare`, the scheduler is wrapped in an `AcceleratedScheduler`, which has no
`__getattr__`: reach `ClipAwareLR` attributes through `.scheduler` (e.g. `scheduler.scheduler.schedule.metrics()`).
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LRScheduler

from ..integrations.names import register_scheduler_name
from .policies import ClipPolicy
from .schedule import ClipAwareSchedule, unwrap_accelerated_optimizer


__all__ = [
    "SCHEDULER_NAMES",
    "ClipAwareLR",
    "get_clip_aware_schedule",
    "get_step_length_clip_schedule",
    "register_clip_scheduler_names",
]


class ClipAwareLR(LRScheduler):
    """A base learning-rate scheduler plus a clip-aware schedule that observes every optimizer step.

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer both act on (Accelerate's wrapper is fine).
        base_scheduler (`torch.optim.lr_scheduler.LRScheduler`): Sets eta_t; stepped, saved and reported as is.
        schedule ([`ClipAwareSchedule`], `str` or [`ClipPolicy`]): The clip schedule, or a policy for one.

    Example:

    ```python
    >>> base = transformers.get_cosine_schedule_with_warmup(optimizer, 100, 10_000)
    >>> scheduler = ClipAwareLR(optimizer, base, ClipAwareSchedule("step_length", gamma=0.05))
    >>> # loop: backward -> optimizer.step() (clipped at gamma / eta_t in a pre-step hook) -> scheduler.step()
    ```
    """

    def __init__(self, optimizer, base_scheduler: LRScheduler, schedule: ClipAwareSchedule | str | ClipPolicy):
        # LRScheduler.__init__ is deliberately not called: it would step the schedule a second time. Everything
        # the base class would hold is forwarded to `base_scheduler`.
        if not isinstance(base_scheduler, LRScheduler):
            raise TypeError(f"base_scheduler must be a torch LRScheduler, got {type(base_scheduler).__name__}")
        self.optimizer = optimizer
        self.base_scheduler = base_scheduler
        self.schedule = schedule if isinstance(schedule, ClipAwareSchedule) else ClipAwareSchedule(schedule)
        self.schedule.attach(optimizer)
        self._install_telemetry(unwrap_accelerated_optimizer(optimizer))

    def _install_telemetry(self, inner) -> None:
        own = inner.__dict__.get("telemetry")
        inherited = own or getattr(inner, "telemetry", None)
        schedule = self.schedule

        def telemetry() -> dict[str, float]:
            metrics = dict(inherited()) if callable(inherited) else {}
            metrics.update(schedule.metrics())
            return metrics

        inner.telemetry = telemetry

    # ---- forwarded scheduler API -------------------------------------------------------------------------------

    def step(self, *args, **kwargs) -> None:
        self.base_scheduler.step(*args, **kwargs)

    def get_last_lr(self):
        return self.base_scheduler.get_last_lr()

    def get_lr(self):
        return self.base_scheduler.get_lr()

    @property
    def last_epoch(self):
        return self.base_scheduler.last_epoch

    @last_epoch.setter
    def last_epoch(self, value):
        self.base_scheduler.last_epoch = value

    @property
    def base_lrs(self):
        return self.base_scheduler.base_lrs

    @property
    def _step_count(self):
        return self.base_scheduler._step_count

    @_step_count.setter
    def _step_count(self, value):
        # AcceleratedScheduler bumps `_step_count` on accumulation micro-steps.
        self.base_scheduler._step_count = value

    def __getattr__(self, name):
        base = self.__dict__.get("base_scheduler")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def state_dict(self) -> dict:
        return {"base": self.base_scheduler.state_dict(), "clip": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_scheduler.load_state_dict(state_dict["base"])
        self.schedule.load_state_dict(state_dict["clip"])


# Names that cannot serve as the base: ours (recursion) and the ones the Trainer does not step once per update.
_NOT_A_BASE = ("reduce_lr_on_plateau", "greedy")


def _build_base(optimizer, base_scheduler, num_warmup_steps, num_training_steps, base_scheduler_kwargs):
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    valid = [m.value for m in SchedulerType if m.value not in _NOT_A_BASE and m.value not in SCHEDULER_NAMES]
    if base_scheduler not in valid:
        raise ValueError(f"Invalid base_scheduler {base_scheduler!r}; valid values: {', '.join(valid)}")
    return get_scheduler(
        base_scheduler,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=base_scheduler_kwargs,
    )


def get_clip_aware_schedule(
    optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    *,
    clip_policy: str = "fixed",
    apply_to: str = "grad",
    base_scheduler: str = "linear",
    base_scheduler_kwargs: dict | None = None,
    **policy_kwargs,
) -> ClipAwareLR:
    """`lr_scheduler_type="clip_aware"`: any clip policy on top of any transformers schedule.

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer.
        num_warmup_steps (`int`, *optional*): Passed to the base schedule.
        num_training_steps (`int`, *optional*): Passed to the base schedule.
        clip_policy (`str`, *optional*, defaults to `"fixed"`): A name from `list_clip_policies()`.
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` or `"lr"`.
        base_scheduler (`str`, *optional*, defaults to `"linear"`): A transformers `lr_scheduler_type`.
        base_scheduler_kwargs (`dict`, *optional*): The base schedule's extra arguments.
        policy_kwargs: The policy's arguments (`max_norm` is required for `fixed`).
    """
    if clip_policy == "fixed" and policy_kwargs.get("max_norm") is None:
        raise ValueError(
            "lr_scheduler_type='clip_aware' with clip_policy='fixed' needs max_norm in lr_scheduler_kwargs "
            "(or use ClipAwareCallback, which inherits max_grad_norm)."
        )
    if clip_policy == "unitwise":
        raise ValueError(
            "clip_policy='unitwise' needs parameter names to exclude the classifier, which a scheduler never sees; "
            "use ClipAwareCallback('unitwise') instead."
        )
    schedule = ClipAwareSchedule(clip_policy, apply_to=apply_to, **policy_kwargs)
    base = _build_base(optimizer, base_scheduler, num_warmup_steps, num_training_steps, base_scheduler_kwargs)
    return ClipAwareLR(optimizer, base, schedule)


def get_step_length_clip_schedule(
    optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    *,
    gamma: float | None = None,
    gamma_schedule: str = "constant",
    apply_to: str = "grad",
    base_scheduler: str = "linear",
    base_scheduler_kwargs: dict | None = None,
) -> ClipAwareLR:
    """`lr_scheduler_type="clip_step_length"`: the step size min(eta_t, gamma / ||g_t||) on a base schedule.

    Args:
        gamma (`float`): The step-length cap (required).
        gamma_schedule (`str`, *optional*, defaults to `"constant"`): `"constant"` or `"follow_lr"`.
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` (clip at gamma / eta_t) or `"lr"` (scale the lr).
        base_scheduler, base_scheduler_kwargs, num_warmup_steps, num_training_steps: as for `clip_aware`.
    """
    if gamma is None:
        raise ValueError("lr_scheduler_type='clip_step_length' needs lr_scheduler_kwargs={'gamma': <step cap>}")
    schedule = ClipAwareSchedule("step_length", apply_to=apply_to, gamma=gamma, gamma_schedule=gamma_schedule)
    base = _build_base(optimizer, base_scheduler, num_warmup_steps, num_training_steps, base_scheduler_kwargs)
    return ClipAwareLR(optimizer, base, schedule)


#: `lr_scheduler_type` name -> factory.
SCHEDULER_NAMES = {"clip_aware": get_clip_aware_schedule, "clip_step_length": get_step_length_clip_schedule}


def register_clip_scheduler_names() -> None:
    """Add `clip_aware` and `clip_step_length` to `TrainingArguments.lr_scheduler_type`. Idempotent."""
    for name, factory in SCHEDULER_NAMES.items():
        register_scheduler_name(name, factory)


# Every process that imports hf_clinic (each rank of `accelerate launch` included) gets the names.
register_clip_scheduler_names()
