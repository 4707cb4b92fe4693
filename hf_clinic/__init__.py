"""hf-clinic: effort-light Transformer training inside `transformers.Trainer` and Accelerate.

`import hf_clinic` makes every hf-clinic optimizer and schedule available by name to `TrainingArguments` and
`HfArgumentParser` (e.g. `TrainingArguments(optim="radam")`, `--optim lamb`), and routes hf-clinic telemetry into the
Trainer's own logs. Everything else is plain Python API, re-exported here.
"""

# Importing these modules registers hf-clinic's names with transformers: every optimizer in `OptimizerNames`
# (hf_clinic.integrations.transformers) and lr_scheduler_type="clip_aware" / "clip_step_length" (hf_clinic.clipping).
from .admin import AdminCallback, AdminReport, apply_admin, export_vanilla, load_admin, paper_init, save_vanilla
from .clipping import ClipAwareCallback, ClipAwareLR, ClipAwareSchedule, ClipStats, get_clip_policy, list_clip_policies
from .diagnostics import ClinicCallback, ClinicThresholds, measure_amplification, residual_dependency
from .distributed import LocalClippingCallback, LocalGradientClipping
from .integrations.trainer_logs import MetricsCallback, install_log_contributions
from .integrations.transformers import register_trainer_optimizers  # noqa: F401
from .optim import GeneralizedSignSGD, Lamb, Lars, RAdam
from .param_groups import param_groups
from .registry import OPTIMIZERS, OptimizerInfo, create_optimizer, get_optimizer_info, list_optimizers


__version__ = "0.1.0"

install_log_contributions()

__all__ = [
    "OPTIMIZERS",
    "AdminCallback",
    "AdminReport",
    "ClinicCallback",
    "ClinicThresholds",
    "ClipAwareCallback",
    "ClipAwareLR",
    "ClipAwareSchedule",
    "ClipStats",
    "GeneralizedSignSGD",
    "Lamb",
    "Lars",
    "LocalClippingCallback",
    "LocalGradientClipping",
    "MetricsCallback",
    "OptimizerInfo",
    "RAdam",
    "__version__",
    "apply_admin",
    "create_optimizer",
    "export_vanilla",
    "get_clip_policy",
    "get_optimizer_info",
    "list_clip_policies",
    "list_optimizers",
    "load_admin",
    "measure_amplification",
    "paper_init",
    "param_groups",
    "residual_dependency",
    "save_vanilla",
]
