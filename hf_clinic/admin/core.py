"""Admin (adaptive model initialization) for Hugging Face BERT, Marian/BART and T5 models.

Deep Post-LN Transformers depend heavily on their residual branches, which amplifies small parameter updates into
large output changes and makes training diverge or stall unless warmup and learning rate are tuned carefully. Admin
reparameterises every Post-LN sublayer as

    x_i = LN(ω_i ⊙ x_{i-1} + F_i(x_{i-1}))

with a per-dimension, trainable ω_i initialised from a profiling pass, so that at initialisation each sublayer mixes
residual and branch like the equivalent Pre-LN model, while training keeps Post-LN's potential. ω folds exactly into
the neighbouring LayerNorm and first linears, so an Admin-trained model exports to a stock checkpoint.

NOTE (deviations from the reference implementation, Transformer-Clinic `fairseq/modules/transformer_layer.py`):

* Profiling uses a variance-normalised form of the official recursion that coincides with it when the stack input
  has unit variance (the fairseq setting) and stays ≥ 1 under Hugging Face's default init; see
  `hf_clinic.admin.profile` for the equation and the reasoning.
* Statistics are pooled over several batches and all-reduced across ranks (the official code profiles one batch on
  one GPU and writes `profile.ratio.init`); ω is set in memory, no file is involved.
* `exportable=True` keeps Marian's first encoder/decoder sublayer at exactly ω = 1 (no parameter there): its input
  is the raw embedding sum, which no LayerNorm can absorb (admin.md §6.3). The official value there is 1 as well;
  only its trainability is lost.
* `omega="closed_form"` is the profiling-free O(log N) rule of the authors' later `admin-torch` package.
* T5 is pre-norm, where Admin is undefined (the official code asserts Post-LN). hf_clinic's "Admin-T5" is a trainable
  per-dimension branch gain g, h_i = h_{i-1} + g_i ⊙ F_i(N_i(h_{i-1})), exactly 1 at init (so exactly vanilla T5,
  which already sits at Admin's target dependency profile) and exactly foldable into `o`/`wo`. The paper's gains
  were measured on Post-LN models only; no gain is claimed for T5.

References:
    Liyuan Liu, Xiaodong Liu, Jianfeng Gao, Weizhu Chen, Jiawei Han. "Understanding the Difficulty of Training
    Transformers". EMNLP 2020, arXiv:2004.08249.
    Xiaodong Liu, Kevin Duh, Liyuan Liu, Jianfeng Gao. "Very Deep Transformers for Neural Machine Translation".
    arXiv:2008.07772.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from . import _wiring
from .profile import profile_sites
from .sites import AdminArchitecture, resolve_architecture


logger = logging.getLogger(__name__)

__all__ = [
    "AdminReport",
    "AdminSite",
    "apply_admin",
    "clear_residual_captures",
    "closed_form_omega",
    "has_admin",
    "omega_summary",
]

MARKER = "admin"  # `config.admin`: written to config.json, read by `load_admin`
MARKER_FORMAT = 1


def closed_form_omega(num_residual_sublayers: int) -> float:
    """admin-torch's profiling-free ω for a stack of N residual sublayers: sqrt((N+1)/ln(N+1) − 1).

    N counts sublayers, not layers: 2 per encoder layer, 3 per decoder layer. Examples: N=24 (BERT-base) → 2.601,
    N=12 (6-layer encoder) → 2.017, N=18 (6-layer decoder) → 2.335.

    References:
        `microsoft/admin-torch` v0.1.0, `admin_torch/admin.py` ("O(log n)" output change scale, the default).
    """
    n = int(num_residual_sublayers)
    if n < 1:
        raise ValueError(f"Invalid number of residual sublayers: {num_residual_sublayers}")
    return math.sqrt((n + 1) / math.log(n + 1) - 1)


@dataclasses.dataclass
class AdminSite:
    """One residual sublayer in an [`AdminReport`].

    Attributes:
        name (`str`): the module holding ω (`{name}.admin_omega` is the state-dict key); for a fixed site, the
            norm that would have held it.
        stack (`str`): `"encoder"` or `"decoder"`.
        index (`int`): 1-based position of the sublayer in its stack, in forward order.
        kind (`str`): `"attention"`, `"cross_attention"` or `"ffn"`.
        omega (`float`): the initial ω (a scalar filling the per-dimension vector).
        trainable (`bool`): whether ω is a trainable parameter.
        fixed (`bool`): the site has no parameter and is exactly plain Post-LN (ω ≡ 1), to keep export exact.
        var_residual (`float`, *optional*): profiled Var[x_{i-1}] of the residual this sublayer reads.
        var_branch (`float`, *optional*): profiled Var[F_i] of the branch output after dropout.
    """

    name: str
    stack: str
    index: int
    kind: str
    omega: float
    trainable: bool
    fixed: bool = False
    var_residual: float | None = None
    var_branch: float | None = None


@dataclasses.dataclass
class AdminReport:
    """What [`apply_admin`] did: every site and its ω, how ω was chosen, and on what data.

    Attributes:
        model_type (`str`), wiring (`str`), omega_init (`str`: `"profile"`, `"closed_form"`, `"constant"` or
        `"branch_gain"`), num_batches (`int`), num_processes (`int`), exportable (`bool`), trainable (`bool`),
        sites (`list[AdminSite]`).
    """

    model_type: str
    wiring: str
    omega_init: str
    sites: list[AdminSite]
    num_batches: int = 0
    num_processes: int = 1
    exportable: bool = True
    trainable: bool = True

    def omegas(self, stack: str | None = None) -> list[float]:
        """Initial ω per site, in forward order (optionally of one stack)."""
        return [s.omega for s in self.sites if stack is None or s.stack == stack]

    def summary(self) -> dict[str, float]:
        """Scalars for logs: `admin/omega_mean|min|max` and one `admin/omega_<stack>_max` per stack."""
        values = self.omegas()
        out = {
            "admin/omega_mean": sum(values) / len(values),
            "admin/omega_min": min(values),
            "admin/omega_max": max(values),
        }
        for stack in dict.fromkeys(s.stack for s in self.sites):
            out[f"admin/omega_{stack}_max"] = max(self.omegas(stack))
        return out

    def __str__(self) -> str:
        head = (
            f"Admin on {self.model_type} ({self.wiring}, ω from {self.omega_init}"
            + (f" on {self.num_batches} batch(es) x {self.num_processes} process(es)" if self.num_batches else "")
            + f"; trainable={self.trainable}, exportable={self.exportable}): {len(self.sites)} sites"
        )
        rows = [head, f"  {'stack':8} {'#':>3} {'kind':16} {'omega':>8} {'Var[x]':>10} {'Var[F]':>10}  module"]
        for s in self.sites:
            vx = f"{s.var_residual:10.4g}" if s.var_residual is not None else f"{'-':>10}"
            vf = f"{s.var_branch:10.4g}" if s.var_branch is not None else f"{'-':>10}"
            flag = " (fixed)" if s.fixed else ("" if s.trainable else " (frozen)")
            rows.append(f"  {s.stack:8} {s.index:3d} {s.kind:16} {s.omega:8.4f} {vx} {vf}  {s.name}{flag}")
        return "\n".join(rows)


def has_admin(model: nn.Module) -> bool:
    """Whether `model` carries Admin parameters (applied here, or restored by `load_admin`)."""
    return bool(_wiring.omega_parameters(model))


def omega_summary(model: nn.Module) -> dict[str, float]:
    """Current ω of a model, for logs: `admin/omega_mean|min|max` over all elements of all ω vectors."""
    params = [p.detach().float() for _, p in _wiring.omega_parameters(model)]
    if not params:
        return {}
    flat = torch.cat([p.reshape(-1) for p in params])
    return {
        "admin/omega_mean": flat.mean().item(),
        "admin/omega_min": flat.min().item(),
        "admin/omega_max": flat.max().item(),
    }


def clear_residual_captures(model: nn.Module) -> None:
    """Drop the residuals Admin's capture wiring (Marian, BART) recorded during a forward that was stopped midway.

    The `residual_capture` wiring stores each sublayer's residual on its norm between the branch entry and the norm,
    and clears it when the norm runs. A forward interrupted in between (a hook that raises to stop early, an error)
    leaves the last residual referenced. Tools that stop forwards early should call this afterwards; it is a no-op
    for other wirings and for models without Admin.
    """
    _wiring.clear_captures(model)


def _check_unwrapped(model: nn.Module) -> None:
    if type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
        "OptimizedModule",
        "FullyShardedDataParallel",
    ):
        raise ValueError(
            f"apply_admin got a {type(model).__name__}: apply Admin to the plain model before DDP/FSDP wrapping, "
            "`accelerator.prepare` and `torch.compile` (hooks must exist before compiling, and DDP must see ω)."
        )
    if type(model).__name__.startswith("Peft"):
        raise ValueError(
            "apply_admin got a PEFT model. Profile first, then wrap: call apply_admin(model, batches) on the base "
            "model, then get_peft_model(model, config). (PEFT then freezes ω with the rest of the base model.)"
        )


def _check_marker_format(marker: dict) -> None:
    if marker.get("format") != MARKER_FORMAT:
        raise ValueError(
            f"Unsupported Admin checkpoint format {marker.get('format')!r}; this hf_clinic reads {MARKER_FORMAT}"
        )


def _check_not_applied(model: nn.Module) -> None:
    if has_admin(model):
        n = len(_wiring.omega_parameters(model))
        raise ValueError(
            f"Admin is already applied to this {type(model).__name__} ({n} admin_omega parameters). apply_admin may "
            "be applied only once: re-applying would stack a second ω on every residual. To start over, use "
            "`hf_clinic.admin.export_vanilla(model)` (folds ω into the weights) and apply Admin to the result."
        )
    marker = getattr(getattr(model, "config", None), MARKER, None)
    if marker:
        raise ValueError(
            f"This {type(model).__name__} has an Admin marker in its config (`config.admin`) but no admin_omega "
            "parameters: it was most likely loaded from an Admin checkpoint with stock `from_pretrained`, which drops "
            "ω and gives wrong outputs. Reload it with `hf_clinic.load_admin(path)`."
        )


def _resolve_omega(omega) -> str:
    if isinstance(omega, str):
        if omega not in ("profile", "closed_form"):
            raise ValueError(f"Invalid omega {omega!r}; valid values: 'profile', 'closed_form', or a positive float")
        return omega
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega) or omega <= 0:
        raise ValueError(f"Invalid omega {omega!r}; valid values: 'profile', 'closed_form', or a positive float")
    return "constant"


def apply_admin(
    model: nn.Module,
    batches: Iterable | None = None,
    *,
    omega: str | float = "profile",
    trainable: bool = True,
    exportable: bool = True,
    sites: AdminArchitecture | None = None,
) -> AdminReport:
    """Reparameterise a Post-LN model's residual connections with Admin's ω, in place.

    Adds an fp32 per-dimension parameter `admin_omega` to the norm module of every residual sublayer and installs
    hooks so that sublayer i computes `LN(ω_i ⊙ x_{i-1} + F_i(x_{i-1}))` (BERT family, Marian, BART) or, for T5,
    `h_{i-1} + g_i ⊙ F_i(N_i(h_{i-1}))`. No model code is copied or replaced; the model keeps its class.

    Call it on a freshly initialised model, before building the optimizer, before `get_peft_model`, before
    `accelerator.prepare` / DDP / `torch.compile`; under `torch.distributed`, call it on every rank with that rank's
    batches. Admin is a from-scratch technique: on pretrained weights any ω ≠ 1 changes the pretrained function
    (the authors report no benefit there).

    Args:
        model (`PreTrainedModel`):
            A model whose `config.model_type` is in [`ADMIN_ARCHITECTURES`] (or described by `sites`).
        batches (`Iterable`, *optional*):
            Batches the model accepts (`model(**batch)` for dicts); required for `omega="profile"` on Post-LN models.
            Use one or a few real training batches; they are moved to the model's device.
        omega (`str` or `float`, *optional*, defaults to `"profile"`):
            * `"profile"`: the profiling pass (training-mode forwards, dropout on, no update; separate encoder and
              decoder recursions; ω₁ = 1), with the variance-normalised rule
              ω_{i+1}² = (Var[ω_i ⊙ x_{i-1}] + Var[F_i]) / Var[x_{i-1}] = ω_i² + Var[F_i]/Var[x_{i-1}],
              which equals the official ω_{i+1}² = Var[ω_i ⊙ x_{i-1}] + Var[F_i] whenever the residual has unit
              variance (every LayerNorm output, and the stack input in the fairseq setting). Admin's ω_i is the std of
              the equivalent Pre-LN stream in units of the residual it multiplies, ω = 1 being plain Post-LN; the
              normalisation keeps ω ≥ 1 when the stack input has Var ≠ 1 (HF-initialised Marian: ≈ 0.4, where the
              literal rule gives ω < 1 and stalls training) and gives ω ≈ 1 when branches are tiny. Statistics are
              pooled over `batches` and all-reduced over ranks. See `hf_clinic.admin.profile`.
            * `"closed_form"`: admin-torch's ω = sqrt((N+1)/ln(N+1) − 1) for a stack of N residual sublayers, on
              every sublayer; no data needed.
            * a positive float: that constant on every sublayer.
            For T5 (pre-norm), `"profile"` gives branch gains of exactly 1 (no data needed) and a float sets the
            gains to that constant (an extension with no basis in the paper); `"closed_form"` is refused.
        trainable (`bool`, *optional*, defaults to `True`):
            Make ω a trainable parameter (the official setting). ω is never weight-decayed by the Trainer (it lives on
            a norm module) nor by `hf_clinic.param_groups`.
        exportable (`bool`, *optional*, defaults to `True`):
            For models whose first encoder/decoder sublayer reads a raw embedding sum (Marian), keep that sublayer at
            exactly ω = 1 without a parameter, so [`export_vanilla`] stays exact. BERT, BART and T5 are fully
            exportable either way.
        sites (`AdminArchitecture`, *optional*):
            Override the table entry for this model (e.g. a family not in the table that shares a layout).

    Returns:
        [`AdminReport`]: every site, its initial ω and (when profiled) Var[x], Var[F]. Also logged at INFO level.

    Raises:
        `ValueError`: unsupported model type; Admin already applied; a Pre-LN model with a Post-LN wiring (detected
        by a self-test forward); `omega="closed_form"` on T5; invalid `omega`; `"profile"` without batches.

    Example:

    ```py
    >>> from transformers import MarianConfig, MarianMTModel
    >>> from hf_clinic import apply_admin
    >>> from hf_clinic.admin import paper_init
    >>> model = MarianMTModel(MarianConfig(encoder_layers=18, decoder_layers=18, d_model=256, scale_embedding=True))
    >>> paper_init(model)  # optional: Xavier/N(0, d^-1/2) init of the paper's experiments
    >>> report = apply_admin(model, [next(iter(train_dataloader))])
    >>> print(report)
    ```

    With Accelerate, apply before `prepare` so DDP broadcasts and trains ω:

    ```py
    >>> accelerator = Accelerator()
    >>> apply_admin(model, [next(iter(train_dataloader))])  # every rank; statistics are all-reduced
    >>> optimizer = torch.optim.AdamW(hf_clinic.param_groups(model, weight_decay=0.01), lr=5e-4)
    >>> model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    ```

    References:
        Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249.
    """
    _check_unwrapped(model)
    model_type, arch = resolve_architecture(model, sites)
    kind = _resolve_omega(omega)
    _check_not_applied(model)
    if not arch.post_ln and kind == "closed_form":
        raise ValueError(
            f"omega='closed_form' is Admin's residual weight for Post-LN models; {model_type!r} is pre-norm (T5), "
            "where Admin's residual ω is undefined (the official code asserts Post-LN). hf_clinic uses branch gains "
            "there: omega='profile' (gains exactly 1) or a positive float."
        )
    if arch.post_ln and kind == "profile" and batches is None:
        raise ValueError(
            "omega='profile' needs `batches` (one or a few real training batches); or use omega='closed_form'."
        )

    all_sites = _wiring.find_sites(model, arch, model_type)
    for site in all_sites:
        site.has_omega = not (arch.post_ln and exportable and site.index == 1 and site.producer is None)

    counts: dict[str, int] = {}
    for site in all_sites:
        counts[site.stack] = counts.get(site.stack, 0) + 1
    values: dict[int, float] = {}
    for site in all_sites:
        if not site.has_omega:
            values[id(site)] = 1.0
        elif kind == "closed_form":
            values[id(site)] = closed_form_omega(counts[site.stack])
        elif kind == "constant":
            values[id(site)] = float(omega)
        else:
            values[id(site)] = 1.0  # profiled below; 1 is plain Post-LN (T5: exactly vanilla)

    _wiring.attach(arch, all_sites, values, trainable)
    try:
        _wiring.self_test(model, arch, all_sites, model_type)
        stats: dict[int, object] = {}
        num_batches = 0
        if kind == "profile" and arch.post_ln:
            batch_list = list(batches)
            if not batch_list:
                raise ValueError("omega='profile' got an empty `batches`")
            num_batches = len(batch_list)
            for key, (value, site_stats) in profile_sites(model, all_sites, batch_list, arch.wiring).items():
                values[key], stats[key] = value, site_stats
        elif batches is not None and not arch.post_ln:
            logger.info("Admin-T5 branch gains start at exactly 1; the batches are not needed and were not used.")
    except BaseException:
        _wiring.detach(model)
        raise

    report = AdminReport(
        model_type=model_type,
        wiring=arch.wiring,
        omega_init=("branch_gain" if kind == "profile" and not arch.post_ln else kind),
        sites=[
            AdminSite(
                name=site.norm_name,
                stack=site.stack,
                index=site.index,
                kind=site.kind,
                omega=values[id(site)],
                trainable=trainable and site.has_omega,
                fixed=not site.has_omega,
                var_residual=getattr(stats.get(id(site)), "var_residual", None),
                var_branch=getattr(stats.get(id(site)), "var_branch", None),
            )
            for site in all_sites
        ],
        num_batches=num_batches,
        num_processes=_world_size() if num_batches else 1,
        # Exact export needs a producer (norm or linear) to absorb every ω; T5 gains fold into `o`/`wo` rows.
        exportable=not arch.post_ln or all(site.producer is not None or not site.has_omega for site in all_sites),
        trainable=trainable,
    )
    _mark(model, report, sites is not None)
    logger.info("%s", report)
    return report


def _own_config(model: nn.Module):
    """Give `model` (and every submodule that shares it) a private copy of its config before marking it.

    Models built from one config object share it (`MarianMTModel(cfg)` twice); marking the shared object would mark
    the other model too.
    """
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if value is shared:
                module.__dict__[key] = own
    return own


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mark(model: nn.Module, report: AdminReport, custom_sites: bool) -> None:
    from .checkpoint import add_marker_key

    add_marker_key(model)
    config = getattr(model, "config", None)
    if config is None:
        return
    config = _own_config(model)
    setattr(
        config,
        MARKER,
        {
            "format": MARKER_FORMAT,
            "library": "hf_clinic",
            "model_type": report.model_type,
            "custom_sites": custom_sites,
            "wiring": report.wiring,
            "omega_init": report.omega_init,
            "trainable": report.trainable,
            "exportable": report.exportable,
            "fixed_sites": [s.name for s in report.sites if s.fixed],
            "omega_keys": [f"{s.name}.admin_omega" for s in report.sites if not s.fixed],
            "note": (
                "hf-clinic Admin checkpoint: its admin_omega weights are not part of the stock architecture, so stock "
                "from_pretrained drops them and gives wrong outputs. Load with `hf_clinic.load_admin(path)`; publish "
                "a stock checkpoint with `hf_clinic.save_vanilla(model, path)`."
            ),
        },
    )
