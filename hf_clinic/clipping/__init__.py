"""Clipping-aware schedules: clip policies, the per-step schedule, a Trainer callback and lr-scheduler names.

* [`ClipAwareSchedule`]: one decision per optimizer step from the pre-clip norm G_t and the scheduled lr eta_t
  (clip the gradients, scale this step's lr, or skip a non-finite step), with telemetry and exact state.
* Policies, by name: `fixed`, `step_length`, `percentile` (AutoClip), `zscore` (ZClip), `unitwise` (AGC).
* [`ClipAwareCallback`] for `transformers.Trainer`; [`ClipAwareLR`] and the `lr_scheduler_type` names
  `clip_aware` / `clip_step_length`; `ClipAwareSchedule.clip_` for plain Accelerate loops.

Local gradient clipping across processes (CELGC) lives in `hf_clinic.distributed`.
"""

from .callback import ClipAwareCallback
from .lr_scheduler import (
    SCHEDULER_NAMES,
    ClipAwareLR,
    get_clip_aware_schedule,
    get_step_length_clip_schedule,
    register_clip_scheduler_names,
)
from .policies import (
    CLIP_POLICIES,
    ClipPolicy,
    FixedClip,
    PercentileClip,
    StepLengthClip,
    UnitwiseClip,
    ZScoreClip,
    get_clip_policy,
    list_clip_policies,
    register_clip_policy,
)
from .schedule import ClipAwareSchedule, ClipStats


__all__ = [
    "CLIP_POLICIES",
    "SCHEDULER_NAMES",
    "ClipAwareCallback",
    "ClipAwareLR",
    "ClipAwareSchedule",
    "ClipPolicy",
    "ClipStats",
    "FixedClip",
    "PercentileClip",
    "StepLengthClip",
    "UnitwiseClip",
    "ZScoreClip",
    "get_clip_aware_schedule",
    "get_clip_policy",
    "get_step_length_clip_schedule",
    "list_clip_policies",
    "register_clip_policy",
    "register_clip_scheduler_names",
]
