"""Exporting an Admin model to a stock checkpoint by folding ω into the weights (exact up to rounding).

Post-LN fold (admin.md §6.1). Sublayer k reads x = P(z), the output of an affine-per-feature module P (a LayerNorm,
or a Linear), and x is consumed only by the residual ω_k ⊙ x and by the first linears W_j of the branch. Then

    P.weight ← ω_k ⊙ P.weight (rows),  P.bias ← ω_k ⊙ P.bias,  W_j ← W_j diag(ω_k)^-1,  ω_k ← 1

gives the same function: the rescaled P produces ω_k ⊙ x, dropout commutes with a per-feature scale, and
W_j diag(ω_k)^-1 (ω_k ⊙ x) = W_j x. Each ω folds into a different P (the norm, or embedding norm/projection, before
it), so the folds compose. The final outputs (logits, last hidden state, pooler, generations) are unchanged;
intermediate `hidden_states` come out scaled by the next sublayer's ω.

T5 branch gains fold into the rows of the branch's last linear (`o`, `wo`): W ← diag(g) W. The residual stream is
untouched, so every output, intermediate ones included, is unchanged.

Not exportable exactly: a Post-LN sublayer whose input is not produced by an affine module (Marian's first encoder
and decoder sublayers read `embed_scale * E[ids] + sinusoids`) with ω ≠ 1. `apply_admin(exportable=True)` (the
default) keeps those sites at exactly 1.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import _wiring
from .checkpoint import remove_marker_key
from .core import MARKER, has_admin
from .sites import OMEGA_NAME, AdminArchitecture, resolve_architecture


__all__ = ["AdminExportError", "export_vanilla", "save_vanilla"]


class AdminExportError(ValueError):
    """The model's ω cannot be folded exactly into a stock checkpoint."""


def _scale_rows(module: nn.Module, scale: torch.Tensor, name: str) -> None:
    weight = getattr(module, "weight", None)
    if weight is None:
        raise AdminExportError(f"Admin export: {name} has no affine weight to absorb ω")
    s = scale.to(device=weight.device)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * s.view(shape)).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_((bias.double() * s).to(bias.dtype))


def _divide_columns(linear: nn.Module, scale: torch.Tensor) -> None:
    weight = linear.weight
    weight.copy_((weight.double() / scale.to(weight.device).view(1, -1)).to(weight.dtype))


def export_vanilla(model: nn.Module, *, sites: AdminArchitecture | None = None) -> nn.Module:
    """Return a stock copy of an Admin model, with ω folded into the weights; the Admin model is left unchanged.

    The copy has the same class and config (minus the `admin` entry), no hooks and no `admin_omega` parameters, so
    `save_pretrained` writes a checkpoint that plain `AutoModel*.from_pretrained` loads without hf_clinic, with the
    same final outputs (max relative logit error ~1e-7 in float32, identical greedy generations).

    Args:
        model (`PreTrainedModel`): an Admin model (after `merge_and_unload()` if it was wrapped with PEFT).
        sites (`AdminArchitecture`, *optional*): the custom table the model was wired with, if any.

    Returns:
        `PreTrainedModel`: the stock model.

    Raises:
        [`AdminExportError`]: a site cannot be folded exactly; the message names the site. Example: Marian trained
        with `exportable=False`, whose first-sublayer ω moved away from 1.
        `ValueError`: the model has no Admin parameters, or is wrapped (PEFT, DDP).
    """
    if type(model).__name__.startswith("Peft"):
        raise ValueError("export_vanilla got a PEFT model: call `model = model.merge_and_unload()` first")
    if not has_admin(model):
        if getattr(getattr(model, "config", None), MARKER, None):
            raise ValueError(
                f"export_vanilla: this {type(model).__name__} has an Admin marker in its config (`config.admin`) but "
                "no admin_omega parameters: it was most likely loaded from an Admin checkpoint with stock "
                "`from_pretrained`, which drops ω. Reload it with `hf_clinic.load_admin(path)` and export that."
            )
        raise ValueError(f"export_vanilla: this {type(model).__name__} has no Admin parameters (admin_omega)")
    model_type, arch = resolve_architecture(model, sites)
    out = copy.deepcopy(model)
    all_sites = _wiring.find_sites(out, arch, model_type)
    with torch.no_grad():
        for site in all_sites:
            param = site.norm._parameters.get(OMEGA_NAME)
            if param is None:
                continue  # a fixed site: exactly plain Post-LN
            omega = param.detach().double()
            if not arch.post_ln:
                for _, linear in site.fold:
                    _scale_rows(linear, omega, site.norm_name)
                continue
            if torch.any(omega == 0):
                raise AdminExportError(f"Admin export: ω at {site.omega_name} has zero entries; it cannot be folded")
            if site.producer is None:
                if torch.all(omega == 1):
                    continue
                raise AdminExportError(
                    f"Admin export: {site.omega_name} (the first {site.stack} sublayer) has ω ≠ 1 "
                    f"(min {omega.min().item():.4g}, max {omega.max().item():.4g}), but its input is the raw embedding "
                    "sum, which no LayerNorm or Linear can absorb; a per-dimension ω there has no exact stock "
                    "equivalent. Train with apply_admin(..., exportable=True) (the default), which keeps this site at "
                    "exactly ω = 1."
                )
            _scale_rows(site.producer, omega, site.producer_name)
            for _, linear in site.fold:
                _divide_columns(linear, omega)
    _wiring.detach(out)
    remove_marker_key(out)
    if hasattr(out, "config") and hasattr(out.config, MARKER):
        delattr(out.config, MARKER)
    return out


def save_vanilla(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """Fold ω with [`export_vanilla`] and `save_pretrained` the stock model to `save_directory`.

    The result is the checkpoint to publish: `AutoModel*.from_pretrained(save_directory)` loads it without hf_clinic.
    `save_kwargs` go to `save_pretrained` (`safe_serialization`, `max_shard_size`, `push_to_hub`, ...).

    Example:

    ```py
    >>> from hf_clinic import save_vanilla
    >>> save_vanilla(trainer.model, "out/marian-admin-stock")
    ```
    """
    export_vanilla(model).save_pretrained(save_directory, **save_kwargs)
