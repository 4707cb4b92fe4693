"""Communication-efficient local gradient clipping (CELGC) on top of Accelerate.

CELGC (Liu, Zhuang, Lei, Liao, NeurIPS 2022) is local SGD with per-worker clipping. Every process i takes local steps

    x^i <- x^i - min(eta_t, gamma / ||g^i||) g^i         (equivalently: clip g^i at gamma / eta_t, then SGD at eta_t)

on its own data, without any gradient communication, and the replicas are averaged every I optimizer steps. Under
(L0, L1)-smoothness this keeps the convergence guarantees of clipped SGD with a linear speed-up in the number of
processes, while communicating I times less often.

How it maps onto Accelerate (compare `accelerate.local_sgd.LocalSGD`):

* gradient all-reduce is switched off by entering the DDP model's `no_sync()` for the whole run (which also stops
  DDP's per-forward buffer broadcast);
* the clipping is a [`ClipAwareSchedule`] with the `step_length` policy attached to the optimizer: it clips the
  *local* gradient at gamma / eta_t right before each `optimizer.step()` (and takes over any
  `accelerator.clip_grad_norm_` call the loop still makes, so nothing is clipped twice);
* `step()` counts **optimizer steps** (it ignores gradient-accumulation micro-steps, unlike `LocalSGD.step`, which
  counts calls), and every `local_steps` of them the replicas are averaged by a [`ReplicaAverager`]: one flattened
  all-reduce per dtype for parameters and floating buffers (optionally optimizer state), instead of one per tensor;
* the global clip rate rides along in that same all-reduce.

NOTE: with `apply_to="grad"` (the default) momentum and weight decay see the clipped gradient; `apply_to="lr"`
scales the whole update instead, which is exactly the authors' `SGDClipGrad(clipping_option="local")`
(`MingruiLiu-ML-Lab/Communication-Efficient-Local-Gradient-Clipping`, `nlp/sgd_clip.py`), up to where epsilon sits.
The 'max' and 'global_average' variants of that code, which add a gradient all-reduce per round, are not provided.

References:
    - Liu, Zhuang, Lei, Liao, "A communication-efficient distributed gradient clipping algorithm for training deep
      neural networks", NeurIPS 2022, arXiv:2205.05040.
    - Stich, "Local SGD converges fast and communicates little", ICLR 2019, arXiv:1805.09767.
"""

from __future__ import annotations

from ..clipping.schedule import ClipAwareSchedule, unwrap_accelerated_optimizer
from .averaging import ReplicaAverager


__all__ = ["LocalGradientClipping", "check_local_backend"]

_LOCAL_BACKENDS = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_MLU",
    "MULTI_HPU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_NPU",
    "MULTI_NEURON",
)


def check_local_backend(distributed_type, who: str) -> None:
    """Raise `NotImplementedError` unless replicas can take independent local steps (single process or DDP)."""
    name = getattr(distributed_type, "name", str(distributed_type))
    if name not in _LOCAL_BACKENDS:
        raise NotImplementedError(
            f"{who} supports single-process and DDP-style multi-CPU/GPU training only (like accelerate's LocalSGD); "
            f"got distributed_type={name}. FSDP, DeepSpeed, XLA and Megatron-LM shard or fuse parameters and "
            f"gradients, so replicas cannot step independently and be averaged."
        )


def _check_local_steps(local_steps) -> None:
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 1:
        raise ValueError(f"Invalid local_steps: {local_steps!r} (expected an integer >= 1)")


class _Rounds:
    """Counts optimizer steps since the last average and keeps the clip-rate window; shared by both front-ends."""

    def __init__(self, schedule: ClipAwareSchedule, local_steps: int):
        self.schedule = schedule
        self.local_steps = local_steps
        self.averager: ReplicaAverager | None = None
        self.since_sync = 0
        self._mark = (0, 0)  # schedule (num_steps, num_clipped) at the last average
        self._window = [0.0, 0.0]  # clipped, observed steps summed over processes since the last metrics()

    def count_step(self) -> bool:
        """Count one optimizer step; return whether this is an averaging step."""
        self.since_sync += 1
        return self.since_sync >= self.local_steps

    def sync(self) -> None:
        steps, clipped = self.schedule.num_steps, self.schedule.num_clipped
        local = [clipped - self._mark[1], steps - self._mark[0]]
        if self.averager is not None and self.since_sync > 0:
            local = self.averager.average_(extra=local)
        self._window[0] += local[0]
        self._window[1] += local[1]
        self._mark = (steps, clipped)
        self.since_sync = 0

    def metrics(self) -> dict[str, float]:
        out = {"local/rounds": float(self.averager.num_rounds if self.averager else 0)}
        if self.averager is not None:
            out["local/bytes_all_reduced"] = float(self.averager.bytes_all_reduced)
        if self._window[1]:
            out["local/clip_rate"] = self._window[0] / self._window[1]
        self._window = [0.0, 0.0]
        return out


class LocalGradientClipping:
    """CELGC for a plain Accelerate loop: local clipped steps, replicas averaged every `local_steps` updates.

    Use it like `accelerate.local_sgd.LocalSGD`: a `with` block around the loop and one `step()` after each
    `optimizer.step()`. The clipping itself needs no call: it runs right before every `optimizer.step()`.

    Args:
        accelerator (`accelerate.Accelerator`): The accelerator that prepared `model` and `optimizer`.
        model (`torch.nn.Module`): The prepared (DDP-wrapped when distributed) model.
        optimizer (`torch.optim.Optimizer`): The prepared optimizer; CELGC is analysed for SGD.
        gamma (`float`): The step-length cap: each local step moves at most gamma (clip threshold gamma / eta_t).
        local_steps (`int`): I, the number of optimizer steps between two averages (1 = average every step).
        gamma_schedule (`str`, *optional*, defaults to `"constant"`): `"follow_lr"` decays gamma with the lr schedule,
            keeping the grad-norm threshold at gamma / eta_peak (the authors' script does this at each lr decay).
        apply_to (`str`, *optional*, defaults to `"grad"`): `"grad"` clips the gradient; `"lr"` scales the lr.
        average_buffers (`bool`, *optional*, defaults to `True`): Also average floating-point buffers.
        average_optimizer_state (`bool`, *optional*, defaults to `False`): Also average the optimizer state.
        bucket_cap_mb (`float`, *optional*): Split each average into collectives of at most this size.
        enabled (`bool`, *optional*, defaults to `True`): `False` makes the whole object a no-op (plain DDP).

    Raises:
        `ValueError`: Bad `gamma`, `local_steps`, ... (the message names the value); a model without `no_sync`.
        `NotImplementedError`: Under FSDP, DeepSpeed, XLA or Megatron-LM.

    Example:

    ```python
    >>> model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    >>> with LocalGradientClipping(accelerator, model, optimizer, gamma=0.05, local_steps=4) as celgc:
    ...     for batch in dataloader:
    ...         with accelerator.accumulate(model):
    ...             accelerator.backward(model(**batch).loss)
    ...             optimizer.step()  # local step, clipped at gamma / lr
    ...             scheduler.step()
    ...             optimizer.zero_grad()
    ...             celgc.step()  # averages every 4 optimizer steps
    ...         if evaluating_now:
    ...             celgc.sync()  # every process: evaluate and save the averaged model
    ...     accelerator.log(celgc.metrics())
    ```
    Leaving the `with` block averages once more, so the model after it is the averaged one.
    """

    def __init__(
        self,
        accelerator,
        model,
        optimizer,
        *,
        gamma: float,
        local_steps: int,
        gamma_schedule: str = "constant",
        apply_to: str = "grad",
        average_buffers: bool = True,
        average_optimizer_state: bool = False,
        bucket_cap_mb: float | None = None,
        enabled: bool = True,
    ):
        _check_local_steps(local_steps)
        check_local_backend(accelerator.distributed_type, type(self).__name__)
        schedule = ClipAwareSchedule("step_length", apply_to=apply_to, gamma=gamma, gamma_schedule=gamma_schedule)
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.enabled = enabled
        self.distributed = enabled and accelerator.num_processes > 1
        if self.distributed and not hasattr(model, "no_sync"):
            raise ValueError(
                f"LocalGradientClipping needs the model returned by accelerator.prepare (a DDP module with no_sync), "
                f"got {type(model).__name__}."
            )
        self._rounds = _Rounds(schedule, local_steps)
        if self.distributed:
            self._rounds.averager = ReplicaAverager(
                model,
                unwrap_accelerated_optimizer(optimizer),
                average_buffers=average_buffers,
                average_optimizer_state=average_optimizer_state,
                bucket_cap_mb=bucket_cap_mb,
            )
        self._no_sync = None

    @property
    def schedule(self) -> ClipAwareSchedule:
        """The step-length clip schedule (its `metrics()` are this process's `clip/*` values)."""
        return self._rounds.schedule

    @property
    def local_steps(self) -> int:
        return self._rounds.local_steps

    @property
    def num_rounds(self) -> int:
        """Averaging rounds (communication rounds) so far."""
        return self._rounds.averager.num_rounds if self._rounds.averager else 0

    def __enter__(self):
        if self.enabled:
            self.schedule.attach(self.optimizer, self.model)
            if self.distributed:
                self._no_sync = self.model.no_sync()
                self._no_sync.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        try:
            if exc_type is None:  # a collective while another process may have died would hang
                self.sync()
        finally:
            if self._no_sync is not None:
                self._no_sync.__exit__(exc_type, exc, tb)
                self._no_sync = None
            self.schedule.detach()
        return False

    def step(self) -> None:
        """Call after `optimizer.step()`: counts optimizer steps (not micro-batches) and averages every I of them."""
        if self.enabled and self.accelerator.sync_gradients and self._rounds.count_step():
            self.sync()

    def sync(self) -> None:
        """Average the replicas now (a no-op right after an average). Every process must call it together."""
        if self.enabled:
            self._rounds.sync()

    def metrics(self) -> dict[str, float]:
        """`local/rounds`, `local/bytes_all_reduced`, `local/clip_rate` (all processes, since the previous call,
        counted at averages) and this process's `clip/*` values."""
        return {**self.schedule.metrics(), **self._rounds.metrics()}
