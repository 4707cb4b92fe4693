"""`LocalClippingCallback`: CELGC inside `transformers.Trainer`.

The Trainer has no local-SGD mode: under DDP it all-reduces the gradients on the last micro-batch of every step. The
callback changes three things, without subclassing the Trainer:

1. **No gradient communication.** DDP is put in `no_sync()` for the whole run, which stops both the gradient
   all-reduce and the per-forward buffer broadcast (the Trainer's own `no_sync` on earlier micro-batches nests
   harmlessly). Callbacks only ever see the unwrapped model, so the callback registers that model at `on_init_end`
   and learns which DDP module wraps it when the Trainer calls `Accelerator.prepare_model` (wrapped once, at class
   level; it passes through untouched for unregistered models). Pass the callback to `Trainer(callbacks=[...])`.
2. **Local clipping at gamma / eta_t.** As in [`ClipAwareCallback`], the step-length schedule takes over the
   Trainer's single `accelerator.clip_grad_norm_` call per step; without an all-reduce that norm is the local one.
3. **Averaging every I optimizer steps** at `on_step_end`, and additionally whenever the Trainer is about to
   save, evaluate or stop (`control.should_save`, `should_evaluate`, `should_training_stop`, set by the flow
   callbacks that run before user callbacks), at `on_epoch_end` when it will save or evaluate, and at
   `on_train_end`. Checkpoints and metrics therefore always come from the averaged model, and a resumed run
   continues the same averaging phase (a save resets the counter in both runs).

Logged with the `clip/*` metrics (this process): `local/rounds`, `local/bytes_all_reduced` and `local/clip_rate`
(all processes, counted at averages). DeepSpeed and FSDP are refused at `on_init_end`, XLA and Megatron-LM at
`on_train_begin`.

NOTE: the optimizer state is rank-local unless `average_optimizer_state=True`; the Trainer checkpoints rank 0's
optimizer, so with momentum or Adam only that setting makes resume identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import weakref

from ..clipping.callback import ClipAwareCallback, current_distributed_type
from ..clipping.schedule import unwrap_accelerated_optimizer
from .averaging import ReplicaAverager
from .local_clipping import _check_local_steps, _Rounds, check_local_backend


__all__ = ["LocalClippingCallback"]

# unwrapped model -> weak reference to the module `Accelerator.prepare_model` returned for it (filled by the
# class-level hook; weak, because the DDP module holds the model)
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _install_prepare_hook() -> None:
    from accelerate import Accelerator

    original = Accelerator.prepare_model
    if getattr(original, "_hf_clinic_wrapped", False):
        return

    @functools.wraps(original)
    def prepare_model(self, model, *args, **kwargs):
        prepared = original(self, model, *args, **kwargs)
        if model in _PREPARED and not kwargs.get("evaluation_mode", False):
            _PREPARED[model] = weakref.ref(prepared)
        return prepared

    prepare_model._hf_clinic_wrapped = True
    Accelerator.prepare_model = prepare_model


class LocalClippingCallback(ClipAwareCallback):
    """CELGC under `transformers.Trainer`: local steps clipped at gamma / eta_t, replicas averaged every I updates.

    Args:
        gamma (`float`): The step-length cap.
        local_steps (`int`): I, the optimizer steps between two averages.
        gamma_schedule (`str`, *optional*, defaults to `"constant"`): `"constant"` or `"follow_lr"`.
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` clips the gradient; `"lr"` scales the lr.
        average_buffers (`bool`, *optional*, defaults to `True`): Also average floating-point buffers.
        average_optimizer_state (`bool`, *optional*, defaults to `False`): Also average the optimizer state.
        bucket_cap_mb (`float`, *optional*): Largest flat buffer per collective.

    Example:

    ```python
    >>> args = TrainingArguments("out", optim="sgd", learning_rate=0.1, lr_scheduler_type="constant")
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[LocalClippingCallback(gamma=0.05, local_steps=4)])
    >>> trainer.train()  # accelerate launch --multi_gpu --num_processes N train.py
    ```
    """

    def __init__(
        self,
        gamma: float,
        local_steps: int,
        *,
        gamma_schedule: str = "constant",
        apply_to: str = "grad",
        average_buffers: bool = True,
        average_optimizer_state: bool = False,
        bucket_cap_mb: float | None = None,
    ):
        _check_local_steps(local_steps)
        super().__init__("step_length", apply_to=apply_to, gamma=gamma, gamma_schedule=gamma_schedule)
        self.local_steps = local_steps
        self.average_buffers = average_buffers
        self.average_optimizer_state = average_optimizer_state
        self.bucket_cap_mb = bucket_cap_mb
        self._rounds = _Rounds(self.schedule, local_steps)
        self._no_sync = None

    def state(self) -> dict:
        policy = self.schedule.policy
        return {
            "args": {
                "gamma": policy.gamma,
                "local_steps": self.local_steps,
                "gamma_schedule": policy.gamma_schedule,
                "apply_to": self.schedule.apply_to,
                "average_buffers": self.average_buffers,
                "average_optimizer_state": self.average_optimizer_state,
                "bucket_cap_mb": self.bucket_cap_mb,
            },
            "attributes": {"clip_state": self.schedule.state_dict()},
        }

    def on_init_end(self, args, state, control, model=None, **kwargs):
        super().on_init_end(args, state, control, **kwargs)
        if model is not None:
            _PREPARED.setdefault(model, None)
            _install_prepare_hook()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        distributed_type = current_distributed_type()
        if distributed_type is not None:
            check_local_backend(distributed_type, type(self).__name__)
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        self._rounds.since_sync = 0
        if args.world_size <= 1:
            return
        ref = _PREPARED.get(model)
        prepared = ref() if ref is not None else None
        if prepared is None or not hasattr(prepared, "no_sync"):
            raise RuntimeError(
                f"{type(self).__name__} did not see the Trainer wrap the model in DDP. Pass it to "
                f"Trainer(callbacks=[...]) (not trainer.add_callback after construction), so that it is registered "
                f"before Accelerate prepares the model."
            )
        self._no_sync = prepared.no_sync()
        self._no_sync.__enter__()
        if self._rounds.averager is None:
            self._rounds.averager = ReplicaAverager(
                model,
                unwrap_accelerated_optimizer(optimizer),
                average_buffers=self.average_buffers,
                average_optimizer_state=self.average_optimizer_state,
                bucket_cap_mb=self.bucket_cap_mb,
            )

    def on_step_end(self, args, state, control, **kwargs):
        due = self._rounds.count_step()
        if due or control.should_save or control.should_evaluate or control.should_training_stop:
            self._rounds.sync()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate:
            self._rounds.sync()

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self._rounds.sync()
        finally:
            if self._no_sync is not None:
                self._no_sync.__exit__(None, None, None)
                self._no_sync = None
            super().on_train_end(args, state, control, **kwargs)

    def log_metrics(self, args, state) -> dict[str, float]:
        return {**super().log_metrics(args, state), **self._rounds.metrics()}
