"""`AdminCallback`: Admin inside `transformers.Trainer`, profiled on the Trainer's own training batches.

Timing. A Trainer callback sees `model, optimizer, lr_scheduler, train_dataloader` only through events, and no event
has both "the optimizer does not exist yet" and "the training dataloader exists":

* `on_init_end` (end of `Trainer.__init__`): no optimizer, no dataloader, no DDP wrap yet.
* `train()` loads the checkpoint weights on resume, then `_inner_training_loop` builds the dataloader, creates the
  optimizer, runs `accelerator.prepare` (DDP wrap and parameter broadcast) and calls `on_train_begin`; the optimizer
  state is still empty there (Adam creates it lazily on the first step) and no batch has been consumed.

So the callback works in two phases:

1. `on_init_end`: attach ω to the model (at 1, i.e. plain Post-LN, for `omega="profile"`; at its final value for
   `"closed_form"` or a float). ω therefore exists when the Trainer creates its optimizer and is trained with the
   rest of the model (out of weight decay: it sits on a norm module).
2. `on_train_begin`, fresh run (`state.global_step == 0` and empty optimizer state): take the first
   `num_batches` micro-batches of the Trainer's prepared `train_dataloader` (by default
   `gradient_accumulation_steps`, i.e. exactly the data of the first optimizer step) and run the profiling pass,
   filling ω *in place*. No optimizer step has happened, so this is the same as if ω had been created with these
   values; the statistics are all-reduced, so every DDP rank sets the same ω (DDP's broadcast at wrap time saw the
   placeholders, and does not run again). Peeking does not change the training data: the iteration is abandoned
   before the sampler's epoch advances, and the prepared loader re-seeds its sampler per epoch, so training
   starts with the very batches that were profiled.
   On resume (`global_step > 0` or optimizer state present), the Trainer has already loaded the checkpoint's ω into
   the attached parameters, so the callback does not profile and the checkpoint's ω wins.

PEFT: profile first, then wrap. Call `apply_admin(model, batches)` (or `load_admin`) on the base model before
`get_peft_model`; PEFT then freezes ω with the base weights, and the callback only logs ω. A PEFT model without
Admin is refused: PEFT adapter checkpoints do not save ω, so it could not survive a resume.

Every training log gets `admin/omega_mean|min|max` (through `hf_clinic.MetricsCallback`); the profiling report goes
to `logging` at INFO level.
"""

from __future__ import annotations

import logging

from ..integrations.trainer_logs import MetricsCallback
from . import _wiring
from ._wiring import omega_parameters as _omegas
from .core import AdminReport, _check_unwrapped, apply_admin, has_admin, omega_summary
from .profile import profile_sites
from .sites import OMEGA_NAME, AdminArchitecture, resolve_architecture


logger = logging.getLogger(__name__)

__all__ = ["AdminCallback"]


class AdminCallback(MetricsCallback):
    """Apply Admin to the Trainer's model and profile ω on the Trainer's own first training batches.

    See the module docstring for exactly what happens when. The callback only works through `Trainer(...,
    callbacks=[AdminCallback()])`: it needs the `on_init_end` event, which fires inside `Trainer.__init__`.

    Args:
        omega (`str` or `float`, *optional*, defaults to `"profile"`): as in [`apply_admin`].
        num_batches (`int`, *optional*): micro-batches to profile on; defaults to
            `args.gradient_accumulation_steps` (the first optimizer step's data).
        trainable (`bool`, *optional*, defaults to `True`): as in [`apply_admin`].
        exportable (`bool`, *optional*, defaults to `True`): as in [`apply_admin`].
        sites (`AdminArchitecture`, *optional*): as in [`apply_admin`].
        enabled (`bool`, *optional*, defaults to `True`): `False` makes the callback a no-op (for A/B runs).

    Raises:
        `ValueError` (at `Trainer(...)`): unsupported model, a user-supplied optimizer (it would not contain ω), a
        PEFT model without Admin. `NotImplementedError`: DeepSpeed or FSDP (use [`apply_admin`] before building the
        Trainer instead).

    Example:

    ```py
    >>> from hf_clinic import AdminCallback, save_vanilla
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[AdminCallback()])
    >>> trainer.train()                     # ω profiled on the first batches, then trained
    >>> save_vanilla(trainer.model, "out/stock")   # a checkpoint anyone can load
    ```
    """

    def __init__(
        self,
        omega: str | float = "profile",
        *,
        num_batches: int | None = None,
        trainable: bool = True,
        exportable: bool = True,
        sites: AdminArchitecture | None = None,
        enabled: bool = True,
    ):
        if num_batches is not None and (isinstance(num_batches, bool) or int(num_batches) < 1):
            raise ValueError(f"Invalid num_batches: {num_batches}")
        self.omega = omega
        self.num_batches = num_batches
        self.trainable = trainable
        self.exportable = exportable
        self.sites = sites
        self.enabled = enabled
        self.report: AdminReport | None = None
        self.profiled = False
        self._model = None
        self._pending = False

    # --- events -----------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.enabled:
            return
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise NotImplementedError(
                "AdminCallback does not support DeepSpeed or FSDP (parameters are sharded by the time it profiles). "
                "Call hf_clinic.apply_admin(model, batches) before building the Trainer instead."
            )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._model = base
        if has_admin(base):
            logger.info("AdminCallback: the model already carries Admin (apply_admin/load_admin); logging ω only.")
            return
        if base is not model:
            raise ValueError(
                "AdminCallback got a PEFT model without Admin. Profile first, then wrap: apply_admin(model, batches) "
                "(or load_admin) on the base model, then get_peft_model. PEFT adapter checkpoints do not store ω."
            )
        if optimizer is not None:
            raise ValueError(
                "AdminCallback adds ω parameters when the Trainer is built, before it creates its optimizer; the "
                "optimizer passed with `optimizers=` would not contain them. Call apply_admin(model, batches) before "
                "creating that optimizer instead."
            )
        _check_unwrapped(base)
        profile = self.omega == "profile" and resolve_architecture(base, self.sites)[1].post_ln
        # For profiling, attach at ω = 1 (plain Post-LN) now and fill in place at on_train_begin.
        self.report = apply_admin(
            base,
            omega=1.0 if profile else self.omega,
            trainable=self.trainable,
            exportable=self.exportable,
            sites=self.sites,
        )
        self._pending = profile

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self.enabled:
            return
        current = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self._model is None or (current is not None and current is not self._model) or not has_admin(self._model):
            raise ValueError(
                "AdminCallback: the model has no Admin parameters at train begin (was it rebuilt by `model_init`?). "
                "Call apply_admin inside model_init instead."
            )
        if not self._pending:
            return
        self._pending = False
        resumed = state.global_step > 0 or bool(getattr(optimizer, "state", None))
        if resumed:
            # The initial (profiled) ω of the original run is not stored in checkpoints; report what was loaded.
            loaded = {n[: -len(".admin_omega")]: p.detach().float().mean().item() for n, p in _omegas(self._model)}
            for entry in self.report.sites:
                entry.omega = loaded.get(entry.name, entry.omega)
                entry.var_residual = entry.var_branch = None
            self.report.omega_init = "checkpoint"
            logger.info(
                "AdminCallback: resumed at step %d; keeping the checkpoint's ω (no profiling).", state.global_step
            )
            return
        n = self.num_batches or max(int(args.gradient_accumulation_steps), 1)
        batches = _peek(train_dataloader, n)
        model_type, arch = resolve_architecture(self._model, self.sites)
        sites = _wiring.find_sites(self._model, arch, model_type)
        for site in sites:
            site.has_omega = OMEGA_NAME in site.norm._parameters
        results = profile_sites(self._model, sites, batches, arch.wiring)
        by_name = {site.norm_name: results[id(site)] for site in sites}
        for entry in self.report.sites:
            omega, stats = by_name[entry.name]
            entry.omega = omega
            entry.var_residual = getattr(stats, "var_residual", None)
            entry.var_branch = getattr(stats, "var_branch", None)
        self.report.omega_init = "profile"
        self.report.num_batches = len(batches)
        self.report.num_processes = max(int(getattr(args, "world_size", 1)), 1)
        self.profiled = True
        marker = getattr(self._model.config, "admin", None)
        if isinstance(marker, dict):
            marker["omega_init"] = "profile"
        logger.info(
            "AdminCallback profiled ω on the Trainer's first %d training batch(es):\n%s", len(batches), self.report
        )

    def log_metrics(self, args, state) -> dict[str, float]:
        if not self.enabled or self._model is None:
            return {}
        return omega_summary(self._model)


def _peek(dataloader, n: int) -> list:
    """The first `n` batches of `dataloader`, leaving its epoch and sampler state as they were."""
    if dataloader is None:
        raise ValueError("AdminCallback: the Trainer has no train_dataloader to profile on")
    iterator = iter(dataloader)
    batches = []
    try:
        for _ in range(n):
            batches.append(next(iterator))
    except StopIteration:
        pass
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        # accelerate's DataLoaderShard registers itself in the GradientState on iteration; unregister the
        # abandoned iteration so it cannot be mistaken for the training one.
        end = getattr(dataloader, "end", None)
        if callable(end):
            end()
    if not batches:
        raise ValueError("AdminCallback: the training dataloader is empty")
    return batches
