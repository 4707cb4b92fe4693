"""Averaging model replicas across processes with one flattened all-reduce per dtype (or per bucket).

`accelerate.local_sgd.LocalSGD` averages with one `accelerator.reduce` per parameter tensor: O(#tensors) collectives
per round, each with its own latency, and no buffers or optimizer state. [`ReplicaAverager`] instead concatenates
every tensor of one dtype (parameters, floating-point buffers such as BatchNorm statistics, and optionally the
optimizer's floating-point state) into a single flat buffer, runs one `torch.distributed.all_reduce(SUM)` on it,
divides by the world size and copies the mean back. `bucket_cap_mb` splits that buffer when memory matters.

A few extra scalars (e.g. clip counters) can ride along in the same collective, so telemetry costs no round.

NOTE: averaging optimizer state assumes every process holds the same state entries (true once every process has
taken a step). Integer tensors (step counters, `num_batches_tracked`) are left alone: they agree across replicas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


__all__ = ["ReplicaAverager"]


class ReplicaAverager:
    """Average parameters, floating-point buffers and optionally optimizer state across processes.

    Args:
        model (`torch.nn.Module`): The replica (DDP-wrapped or not; the same tensors either way).
        optimizer (`torch.optim.Optimizer`, *optional*): Whose floating-point state to average.
        average_buffers (`bool`, *optional*, defaults to `True`): Also average floating-point buffers.
        average_optimizer_state (`bool`, *optional*, defaults to `False`): Also average the optimizer state
            (momentum, Adam moments); the local-SGD literature (and CELGC) average parameters only.
        bucket_cap_mb (`float`, *optional*): Largest flat buffer per collective; `None` means one per dtype.
        group (`torch.distributed.ProcessGroup`, *optional*): The process group (default: the world).

    Attributes:
        num_rounds (`int`): Averaging rounds so far.
        num_collectives (`int`): `all_reduce` calls issued so far.
        bytes_all_reduced (`int`): Payload bytes handed to `all_reduce` so far.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer=None,
        *,
        average_buffers: bool = True,
        average_optimizer_state: bool = False,
        bucket_cap_mb: float | None = None,
        group=None,
    ):
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (expected a number > 0 or None)")
        if average_optimizer_state and optimizer is None:
            raise ValueError("average_optimizer_state=True needs the optimizer.")
        self.model = model
        self.optimizer = optimizer
        self.average_buffers = average_buffers
        self.average_optimizer_state = average_optimizer_state
        self.bucket_cap_bytes = None if bucket_cap_mb is None else int(bucket_cap_mb * 2**20)
        self.group = group
        self.num_rounds = 0
        self.num_collectives = 0
        self.bytes_all_reduced = 0

    def tensors(self) -> list[torch.Tensor]:
        """The tensors one round averages, in an order every process agrees on."""
        out = [p.detach() for p in self.model.parameters() if p.requires_grad]
        if self.average_buffers:
            out += [b for b in self.model.buffers() if torch.is_floating_point(b)]
        if self.average_optimizer_state:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    for key, value in self.optimizer.state.get(p, {}).items():
                        if (
                            key != "step"
                            and torch.is_tensor(value)
                            and torch.is_floating_point(value)
                            and value.numel()
                        ):
                            out.append(value)
        return out

    def _buckets(self, tensors: list[torch.Tensor]):
        if self.bucket_cap_bytes is None:
            yield tensors
            return
        bucket, size = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.bucket_cap_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket

    @torch.no_grad()
    def average_(self, extra: Sequence[float] = ()) -> list[float]:
        """Replace every tensor by its mean over the processes; return `extra` summed over the processes.

        Every process must call this at the same point (it is a collective).
        """
        world_size = dist.get_world_size(self.group)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in self.tensors():
            groups.setdefault((t.device, t.dtype), []).append(t)
        extra = [float(x) for x in extra]
        summed = list(extra)
        carried = not extra
        for (device, dtype), tensors in groups.items():
            for bucket in self._buckets(tensors):
                parts = [t.reshape(-1) for t in bucket]
                ride = not carried and dtype in (torch.float32, torch.float64)
                if ride:
                    parts.append(torch.tensor(extra, dtype=dtype, device=device))
                flat = torch.cat(parts)
                self._all_reduce(flat)
                if ride:
                    summed = flat[-len(extra) :].tolist()
                    flat = flat[: -len(extra)]
                    carried = True
                flat.div_(world_size)
                for t, mean in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                    t.copy_(mean.view_as(t))
        if not carried:
            device = next(iter(groups))[0] if groups else torch.device("cpu")
            flat = torch.tensor(extra, dtype=torch.float64, device=device)
            self._all_reduce(flat)
            summed = flat.tolist()
        self.num_rounds += 1
        return summed

    def _all_reduce(self, flat: torch.Tensor) -> None:
        # Looked up on the module at call time: one collective, and tests may count it.
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.num_collectives += 1
        self.bytes_all_reduced += flat.numel() * flat.element_size()
