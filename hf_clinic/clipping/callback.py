"""`ClipAwareCallback`: a clipping-aware schedule inside `transformers.Trainer`.

How it is wired (transformers 5.23, `Trainer._run_epoch`). After the last micro-batch of an optimizer step the
Trainer calls `self._clip_grad_norm(model)` when `max_grad_norm > 0`, and `self._get_grad_norm(model)` in any
case; both reach `self.accelerator.clip_grad_norm_(model.parameters(), max_norm)`, and the returned pre-clip norm
is what the Trainer logs as `grad_norm`. Then come `on_pre_optimizer_step`, `optimizer.step()`,
`on_optimizer_step`, `lr_scheduler.step()` (unless Accelerate reports a skipped step) and `on_step_end`. No
callback ever receives the pre-clip norm, and in `on_pre_optimizer_step` the gradients are already clipped.

So the callback does not clip in a callback event. At `on_train_begin` it attaches its [`ClipAwareSchedule`] to the
Trainer's optimizer, which routes that single `accelerator.clip_grad_norm_` call of each step to the schedule:

* the policy replaces `max_grad_norm` (the `fixed` policy without `max_norm` inherits it, so
  `ClipAwareCallback()` clips exactly like the Trainer and only adds telemetry);
* the gradient norm is computed once per step, as in the built-in path (no second pass, no second unscale);
* `apply_to="lr"` scales each group's lr for this step and an optimizer step post-hook restores it before
  `lr_scheduler.step()`;
* a non-finite norm sets every gradient to `None`: `optimizer.step()` then leaves parameters and optimizer state
  untouched. The lr scheduler still advances with the step count (under fp16 the GradScaler also reports the
  overflow, and then the Trainer holds the scheduler, as it always does).

`on_pre_optimizer_step` checks that the step really went through the schedule (it does not when the Trainer
computes the norm elsewhere, e.g. SageMaker model parallel or mixed DTensor meshes) and fails loudly otherwise.
The `clip/*` metrics reach TensorBoard, W&B and `log_history` through [`MetricsCallback`]. The schedule's state
(policy history or EMAs, counters) is saved in `trainer_state.json` under `stateful_callbacks` and restored at
`on_train_begin` of a resumed run, whether or not `restore_callback_states_from_checkpoint` is set, so a resumed run
continues exactly.

DeepSpeed (any ZeRO stage) and FSDP are refused at `on_init_end` (from `TrainingArguments`), XLA and Megatron-LM at
`on_train_begin` (from the Accelerate state), before any step is taken.
"""

from __future__ import annotations

import logging

from transformers.trainer_callback import ExportableState

from ..integrations.trainer_logs import MetricsCallback
from .policies import ClipPolicy, FixedClip
from .schedule import ClipAwareSchedule, check_clip_backend


__all__ = ["ClipAwareCallback"]

logger = logging.getLogger(__name__)


def refuse_unsupported_trainer_args(args, who: str) -> None:
    """Raise `NotImplementedError` when `TrainingArguments` select DeepSpeed or FSDP."""
    if getattr(args, "deepspeed", None):
        check_clip_backend("DEEPSPEED", who)
    if getattr(args, "fsdp", None):
        check_clip_backend("FSDP", who)


def current_distributed_type():
    """The running Accelerate backend, or `None` before any Accelerator exists (never initialises one)."""
    from accelerate.state import AcceleratorState, is_initialized

    return AcceleratorState().distributed_type if is_initialized() else None


class ClipAwareCallback(MetricsCallback, ExportableState):
    """Take over the Trainer's gradient clipping with a clip policy, log `clip/*`, and checkpoint its state.

    Args:
        policy (`str` or [`ClipPolicy`], *optional*, defaults to `"fixed"`): A name from
            `hf_clinic.clipping.list_clip_policies()` or a policy object.
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` (clip the gradients) or `"lr"` (scale this
            step's learning rate by the clip coefficient instead).
        policy_kwargs: Constructor arguments of the named policy.

    Logged at every logging step: `clip/grad_norm`, `clip/threshold`, `clip/coef`, `clip/effective_lr` (latest
    step), `clip/rate` (fraction of steps clipped since the previous log), `clip/skipped` (non-finite steps skipped
    so far), plus `clip/lr_scale` with `apply_to="lr"` and `clip/unit_rate` for `unitwise`.

    Raises:
        `ValueError`: For unknown policies or invalid policy arguments.
        `NotImplementedError`: At `on_init_end` / `on_train_begin`, under DeepSpeed, FSDP, XLA or Megatron-LM.

    Example:

    ```python
    >>> from hf_clinic import ClipAwareCallback
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[ClipAwareCallback("zscore", z_thresh=2.5)])
    >>> trainer.train()  # logs clip/rate, clip/threshold, ... next to loss and grad_norm
    ```
    """

    def __init__(self, policy: str | ClipPolicy = "fixed", *, apply_to: str = "grad", **policy_kwargs):
        self.schedule = ClipAwareSchedule(policy, apply_to=apply_to, **policy_kwargs)
        self._observed_at_last_step = -1

    # ---- ExportableState: `args` rebuild the callback, `attributes` restore its state ------------------------

    def state(self) -> dict:
        policy = self.schedule.policy
        return {
            "args": {"policy": policy.name, "apply_to": self.schedule.apply_to, **policy.config()},
            "attributes": {"clip_state": self.schedule.state_dict()},
        }

    @property
    def clip_state(self) -> dict:
        return self.schedule.state_dict()

    @clip_state.setter
    def clip_state(self, value: dict) -> None:
        self.schedule.load_state_dict(value)

    # ---- Trainer events -------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        refuse_unsupported_trainer_args(args, type(self).__name__)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_unsupported_trainer_args(args, type(self).__name__)
        check_clip_backend(current_distributed_type(), type(self).__name__)
        self._restore_from_trainer_state(state)
        if isinstance(self.schedule.policy, FixedClip):
            self.schedule.policy.inherit(args.max_grad_norm)
        elif args.max_grad_norm and args.max_grad_norm > 0:
            logger.info(
                "%s replaces the Trainer's max_grad_norm=%s with %r.",
                type(self).__name__,
                args.max_grad_norm,
                self.schedule.policy,
            )
        if optimizer is None:
            raise RuntimeError(f"{type(self).__name__} needs the Trainer's optimizer at on_train_begin.")
        self.schedule.attach(optimizer, model, observe_in_step=False)
        self._observed_at_last_step = self.schedule.num_steps + self.schedule.num_skipped

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        observed = self.schedule.num_steps + self.schedule.num_skipped
        unseen = observed == self._observed_at_last_step
        self._observed_at_last_step = observed
        if unseen and model is not None and any(p.grad is not None for p in model.parameters()):
            raise RuntimeError(
                f"{type(self).__name__}: this optimizer step did not go through Accelerator.clip_grad_norm_ (the "
                f"Trainer computed the gradient norm another way, e.g. SageMaker model parallelism or mixed "
                f"DTensor meshes), so the clip policy could not run. This setup is not supported."
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.detach()

    def log_metrics(self, args, state) -> dict[str, float]:
        return self.schedule.metrics()

    # ---- internals ------------------------------------------------------------------------------------------

    def _restore_from_trainer_state(self, state) -> None:
        # On a resumed run `state` was read from the checkpoint's trainer_state.json; on a fresh run it holds this
        # callback's own current state, so loading it is a no-op. Doing it here (instead of relying on the Trainer's
        # opt-in `restore_callback_states_from_checkpoint`) makes resume exact by default.
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if saved is None:
            return
        if isinstance(saved, list):
            raise ValueError(f"Only one {type(self).__name__} per Trainer is supported; the state holds {len(saved)}.")
        clip_state = saved.get("attributes", {}).get("clip_state")
        if clip_state is not None:
            self.schedule.load_state_dict(clip_state)
