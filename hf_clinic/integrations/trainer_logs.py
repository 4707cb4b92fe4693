"""Putting hf-clinic metrics into the Trainer's own logs.

The Trainer builds its training log (`loss`, `grad_norm`, `learning_rate`) inside a private method, appends a copy to
`state.log_history`, then calls `on_log` on every callback in order: the reporting callbacks (TensorBoard, W&B, ...)
come first and user callbacks last. A metric added by a user callback in `on_log` therefore never reaches the
reporters. So hf_clinic wraps `CallbackHandler.on_log` once: before any callback sees a training log, it asks

* the optimizer, if it has a `telemetry()` method (every hf_clinic optimizer does), and
* every callback that subclasses [`MetricsCallback`],

for their latest values, adds them to the log and to the matching `state.log_history` entry, then dispatches as
usual. Evaluation and end-of-training logs are left untouched.
"""

import functools
import math

from transformers.trainer_callback import CallbackHandler, TrainerCallback


__all__ = ["MetricsCallback", "install_log_contributions", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """Return the user-level optimizer under Accelerate's `AcceleratedOptimizer` wrapper (which forwards nothing)."""
    while optimizer is not None and hasattr(optimizer, "optimizer") and not hasattr(optimizer, "telemetry"):
        optimizer = optimizer.optimizer
    return optimizer


class MetricsCallback(TrainerCallback):
    """Base class for hf_clinic callbacks whose metrics go into the Trainer's training logs.

    Subclasses override [`MetricsCallback.log_metrics`]; the values it returns are merged into every training log,
    ahead of the reporting integrations.
    """

    def log_metrics(self, args, state) -> dict[str, float]:
        """Metrics to add to the current training log. Called on logging steps only; keep it cheap."""
        return {}


def _is_training_log(logs) -> bool:
    # Training-step logs always carry the learning rate; evaluation and the final summary never do.
    return isinstance(logs, dict) and "learning_rate" in logs


def _finite_or_nan(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def _contributions(handler, args, state) -> dict[str, float]:
    metrics: dict[str, float] = {}
    optimizer = unwrap_optimizer(handler.optimizer)
    telemetry = getattr(optimizer, "telemetry", None)
    if callable(telemetry):
        metrics.update(telemetry())
    for callback in handler.callbacks:
        if isinstance(callback, MetricsCallback):
            metrics.update(callback.log_metrics(args, state))
    return {key: _finite_or_nan(value) for key, value in metrics.items()}


def install_log_contributions() -> None:
    """Wrap `CallbackHandler.on_log` so hf_clinic metrics reach every reporter. Idempotent."""
    original = CallbackHandler.on_log
    if getattr(original, "_hf_clinic_wrapped", False):
        return

    @functools.wraps(original)
    def on_log(self, args, state, control, logs, **kwargs):
        if _is_training_log(logs):
            extra = _contributions(self, args, state)
            if extra:
                logs.update(extra)
                # `Trainer.log` appended `{**logs, "step": ...}` just before calling us.
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1].update(extra)
        return original(self, args, state, control, logs, **kwargs)

    on_log._hf_clinic_wrapped = True
    CallbackHandler.on_log = on_log
