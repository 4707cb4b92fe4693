"""Admin's profiling pass: ω from the variances of residuals and branches on real batches.

The official code (Transformer-Clinic, `transformer_layer.py`, `--init-type adaptive-profiling`) fills ω sublayer by
sublayer during one training-mode forward pass, with one running ratio per stack:

    ω_1 = 1,    ω_{i+1}² = Var[ω_i ⊙ x_{i-1}] + Var[F_i(x_{i-1})]                                    (official)

where x_{i-1} is the residual that sublayer i reads, F_i its branch output after dropout, and Var the population
variance over all elements of the batch tensor (padding included, as in the official code).

NOTE (deliberate deviation): hf_clinic divides each step by the variance of the residual it read:

    ω_1 = 1,    ω_{i+1}² = (Var[ω_i ⊙ x_{i-1}] + Var[F_i(x_{i-1})]) / Var[x_{i-1}]
                         = ω_i² + Var[F_i] / Var[x_{i-1}]                                            (hf_clinic)

Why: Admin's ω_i is the standard deviation of the *equivalent Pre-LN stream* h_{i-1} in units of the residual it
multiplies; ω = 1 is plain Post-LN. A Pre-LN branch always reads a normalised input, so what a sublayer adds to that
stream is its variance gain Var[F_i]/Var[x_{i-1}], and the stack input counts as one unit. For i ≥ 2 the residual
x_{i-1} is a LayerNorm output (γ=1, β=0 at init) with Var ≈ 1, so both rules agree there; they differ only at the
first sublayer, whose residual is the raw stack input x_0. In the fairseq setting (embeddings N(0, d^-1/2) scaled by
√d, Var[x_0] ≈ 1) the hf_clinic rule *is* the official recursion. Under Hugging Face's init, Marian's scaled
embeddings have Var[x_0] ≈ 0.4 and the branches are tiny, so the literal recursion gives ω ≈ 0.64-0.72 < 1: it
weights the residual *less* than plain Post-LN, i.e. makes the model more dependent on its branches, the opposite of
Admin's intent, and training stalls (issue 4, "Measured before filing"). The normalised rule gives ω ≥ 1 always, ω → 1
(plain Post-LN, no harm) when branches add nothing, and is invariant to a rescaling of the embeddings, which the
first LayerNorm removes from the function anyway.

Each ω_{i+1} depends on the ω before it (they shape x_i and F_{i+1}), so statistics are gathered sublayer by
sublayer: for site i, every batch is run forward in training mode (dropout on) under `no_grad` until that site's norm,
the moments are summed over the batches and, under `torch.distributed`, all-reduced over ranks, then ω_{i+1} is set
before the next site. Every rank therefore gets the same ω from the pooled statistics of all ranks' batches. The
encoder stack is profiled before the decoder stack (the decoder reads the encoder output); each stack restarts at 1.
No parameter is updated.

References:
    Liyuan Liu, Xiaodong Liu, Jianfeng Gao, Weizhu Chen, Jiawei Han. "Understanding the Difficulty of Training
    Transformers". EMNLP 2020, arXiv:2004.08249.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from ._wiring import AdminWiringError, Site, clear_captures


logger = logging.getLogger(__name__)

__all__ = ["SiteStatistics", "profile_sites"]


class _StopForward(Exception):
    """Raised by the profiling hook once the site of interest has been measured."""


class SiteStatistics(tuple):
    """`(var_residual, var_branch, count)` pooled over batches and ranks."""

    __slots__ = ()

    def __new__(cls, var_residual: float, var_branch: float, count: int):
        return super().__new__(cls, (var_residual, var_branch, count))

    var_residual = property(lambda self: self[0])
    var_branch = property(lambda self: self[1])
    count = property(lambda self: self[2])


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, dict) or hasattr(batch, "items"):
        model(**batch)
    elif isinstance(batch, (list, tuple)):
        model(*batch)
    else:
        model(batch)


def _all_reduce(moments: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return moments
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = moments.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def _measure(model: nn.Module, site: Site, batches: list, wiring: str, device) -> SiteStatistics:
    """Run `batches` forward until `site`'s norm; return pooled Var[residual], Var[branch]."""
    moments = torch.zeros(5, dtype=torch.float64)  # n, Σx, Σx², ΣF, ΣF²
    slot: dict[str, torch.Tensor] = {}

    def on_entry(module, args, kwargs):
        if wiring == "residual_arg":
            slot["r"] = kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]
        else:
            slot["r"] = args[0] if args else kwargs["hidden_states"]

    def on_norm(module, args):
        residual = slot.pop("r", None)
        if residual is None:
            raise AdminWiringError(f"Admin profiling: {site.norm_name} ran before its branch (Pre-LN layout?)")
        r = residual.detach().double()
        z = args[0].detach().double()
        if wiring == "residual_arg" and site.has_omega:
            # The residual_arg hook already turned the residual into ω⊙r before the norm sees the sum.
            branch = z - module.admin_omega.detach().double() * r
        else:
            branch = z - r  # our norm hook runs before Admin's mix hook: z = r + F
        moments[0] += r.numel()
        moments[1] += r.sum().cpu()
        moments[2] += (r * r).sum().cpu()
        moments[3] += branch.sum().cpu()
        moments[4] += (branch * branch).sum().cpu()
        raise _StopForward

    handles = [
        site.entry.register_forward_pre_hook(on_entry, with_kwargs=True, prepend=True),
        site.norm.register_forward_pre_hook(on_norm, prepend=True),
    ]
    try:
        for batch in batches:
            slot.clear()
            try:
                _call(model, _to_device(batch, device))
            except _StopForward:
                pass
            finally:
                clear_captures(model)
    finally:
        for handle in handles:
            handle.remove()
    n, sx, sxx, sf, sff = _all_reduce(moments).tolist()
    if n == 0:
        raise RuntimeError(
            f"Admin profiling: no batch reached {site.norm_name} (LayerDrop skipped it everywhere, or the batches "
            "do not run this stack, e.g. no decoder inputs)."
        )
    var_x = max(sxx / n - (sx / n) ** 2, 0.0)
    var_f = max(sff / n - (sf / n) ** 2, 0.0)
    return SiteStatistics(var_x, var_f, int(n))


def profile_sites(
    model: nn.Module, sites: list[Site], batches: Iterable, wiring: str
) -> dict[int, tuple[float, SiteStatistics | None]]:
    """Set every site's ω by the normalised profiling rule (module docstring); return `{id(site): (ω, stats)}`.

    Sites without a parameter (Marian's first sublayer in exportable mode) are measured like the others; their ω is 1.
    """
    batches = list(batches)
    param = next(model.parameters())
    stacks: dict[str, list[Site]] = {}
    for site in sites:
        stacks.setdefault(site.stack, []).append(site)
    results: dict[int, tuple[float, SiteStatistics | None]] = {}
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for stack_sites in stacks.values():
                omega_sq = 1.0
                for position, site in enumerate(stack_sites):
                    omega = math.sqrt(omega_sq)
                    if site.has_omega:
                        site.norm.admin_omega.fill_(omega)
                    if position == len(stack_sites) - 1:
                        results[id(site)] = (omega, None)  # the last site's statistics would only set ω_{N+1}
                        break
                    stats = _measure(model, site, batches, wiring, param.device)
                    results[id(site)] = (omega, stats)
                    if stats.var_residual <= 0.0:
                        raise RuntimeError(f"Admin profiling: the residual at {site.norm_name} has zero variance")
                    omega_sq += stats.var_branch / stats.var_residual
    finally:
        model.train(was_training)
    return results
