"""LAMB: layer-wise adaptive moments for large-batch training.

References:
    Yang You, Jing Li, Sashank Reddi, Jonathan Hseu, Sanjiv Kumar, Srinadh Bhojanapalli, Xiaodan Song, James Demmel,
    Kurt Keutzer, Cho-Jui Hsieh, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    ICLR 2020, arXiv:1904.00962 (final version, Alg. 2, with bias correction).
    Reference implementations reproduced by the presets: MLPerf/Google TF `LAMBOptimizer` ("paper"), NVIDIA apex
    `FusedLAMB` ("nvlamb"), timm `Lamb` ("timm"), DeepSpeed `FusedLamb` ("deepspeed"), `optax.lamb` ("optax").

Presets (explicit keyword arguments override a preset's values):

| preset      | differs from the defaults ("paper")                                                           |
|-------------|------------------------------------------------------------------------------------------------|
| "paper"     | nothing: bias-corrected moments, λθ inside u and inside the ratio, φ = identity, adapt="decayed" |
| "nvlamb"    | apex FusedLAMB(use_nvlamb=True): global pre-normalisation `max_grad_norm=1.0`, adapt="all"     |
| "timm"      | timm Lamb defaults: global clip `max_grad_norm=1.0` (adapt="decayed" = `always_adapt=False`)   |
| "deepspeed" | DeepSpeed FusedLamb: eps=1e-8, weight_decay=0, adapt="all", step scaling sqrt(1−β2^t)/(1−β1^t) |
|             | *outside* the ratio on raw moments, ratio clamped to [0.01, 10]                               |
| "optax"     | optax.lamb: weight_decay=0, adapt="all" (every leaf adapted, the mask only gates decay)        |

NOTE: the paper's pseudo-code adapts every layer; the MLPerf reference excludes LayerNorm/bias from both decay and
adaptation, which `adapt="decayed"` reproduces with groups from `hf_clinic.param_groups` (whose no-decay group also
sets `layer_adaptation=False`, honoured in every `adapt` mode).
NOTE: `max_grad_norm` divides every gradient by max(1, G/max_grad_norm), G the global norm over all groups (apex,
timm); it never writes into `p.grad` (apex writes the update into `p.grad`).
NOTE: the step counter is per parameter (apex, timm and DeepSpeed keep one per group); they agree whenever every
parameter receives a gradient on every step.
NOTE: pytorch_optimizer's `lr/(1−β1^t)` outside the ratio and its φ = min(‖θ‖, 10) are deliberately not offered.
NOTE: the "deepspeed" preset keeps DeepSpeed's rule but not its loss-scale/`grad_norms` plumbing (use the Trainer's
clipping) and not `eps_inside_sqrt`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ._base import (
    LAYER_ADAPTATION_KEY,
    LOW_PRECISION_DTYPES,
    ClinicOptimizer,
    check_betas,
    check_choice,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
    record_explicit_kwargs,
    trust_ratio_summary,
)


__all__ = ["LAMB_PRESETS", "Lamb", "LambDegeneratesToAdamWarning", "lamb"]

ADAPT_MODES = ("decayed", "all", "none")

# Each preset is the set of values that differ from the constructor defaults. `ratio_clamp` and
# `scale_outside_ratio` are group keys without a constructor argument: only presets set them.
LAMB_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "nvlamb": {"max_grad_norm": 1.0, "adapt": "all"},
    "timm": {"max_grad_norm": 1.0},
    "deepspeed": {
        "eps": 1e-8,
        "weight_decay": 0.0,
        "adapt": "all",
        "scale_outside_ratio": True,
        "ratio_clamp": (0.01, 10.0),
    },
    "optax": {"weight_decay": 0.0, "adapt": "all"},
}
_PRESET_ONLY_KEYS = ("scale_outside_ratio", "ratio_clamp")


class LambDegeneratesToAdamWarning(UserWarning):
    """`adapt="decayed"` with weight decay 0 in every group: no layer gets a trust ratio, LAMB is Adam."""


def is_adapted(group: dict[str, Any]) -> bool:
    """Whether the trust ratio applies to this group (its `adapt` mode, weight decay and `layer_adaptation`)."""
    if not group.get(LAYER_ADAPTATION_KEY, True):
        return False
    adapt = group["adapt"]
    return adapt == "all" or (adapt == "decayed" and group["weight_decay"] != 0)


class Lamb(ClinicOptimizer):
    r"""LAMB (You et al., 2020): Adam directions rescaled per layer by a trust ratio ‖θ‖/‖u‖.

    At very large batch sizes a single global learning rate is either too large for some layers or too small for
    others. LAMB normalises each layer's Adam(W) update to the layer's weight norm, so every layer moves by about
    `lr` relative to its size. The update, per parameter tensor (layer) at step t, in the paper's order:

    1. `clip_by_global_norm` (optional, `max_grad_norm`): g ← g / max(1, ‖G‖/max_grad_norm), G = all gradients;
    2. `scale_by_adam`: m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  r = m̂ / (sqrt(v̂) + ε) with
       m̂ = m/(1−β1^t), v̂ = v/(1−β2^t) (`bias_correction=True`) or m̂ = m, v̂ = v;
    3. `add_decayed_weights`: u = r + λθ; or, with `decoupled_weight_decay=True`, θ ← (1 − lr·λ)θ and u = r;
    4. `scale_by_trust_ratio` (adapted groups only): u ← u · ‖θ‖/‖u‖ (1 when either norm is 0), then
       min(·, `trust_clip`) (LAMBC); preset "deepspeed" also clamps the ratio to [0.01, 10];
    5. `scale_by_learning_rate`: θ ← θ − lr · u.

    A group is adapted when its `layer_adaptation` key (default True; `hf_clinic.param_groups` sets it False for
    biases, norm gains and Admin's ω) is True and `adapt` is "all", or "decayed" and its weight decay ≠ 0.

    Args:
        params (`iterable`):
            Parameters or param groups (dicts) to optimize. A group may set `layer_adaptation=False`.
        lr (`float`, *optional*, defaults to `1e-3`):
            Learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            β1, β2 of the moment EMAs, each in [0, 1).
        eps (`float`, *optional*, defaults to `1e-6`):
            Added to sqrt(v̂).
        weight_decay (`float`, *optional*, defaults to `0.01`):
            Weight decay λ.
        bias_correction (`bool`, *optional*, defaults to `True`):
            Bias-correct m and v (paper v5, MLPerf, apex, timm, optax).
        adapt (`str`, *optional*, defaults to `"decayed"`):
            Which groups get the trust ratio: `"decayed"` (weight decay ≠ 0; apex/timm default), `"all"`
            (apex `use_nvlamb=True`, optax) or `"none"` (plain Adam(W)).
        max_grad_norm (`float`, *optional*):
            Global gradient pre-normalisation threshold (apex/timm use 1.0); None disables it (prefer the Trainer's
            `max_grad_norm`).
        decoupled_weight_decay (`bool`, *optional*, defaults to `False`):
            Decay θ directly (AdamW style, outside the ratio) instead of adding λθ to u.
        trust_clip (`float`, *optional*):
            Upper bound on the trust ratio (LAMBC uses 1.0); None disables it.
        preset (`str`, *optional*):
            One of "paper", "nvlamb", "timm", "deepspeed", "optax" (see the module docstring). Explicit keyword
            arguments override the preset.
        foreach (`bool`, *optional*):
            Use the `torch._foreach_*` implementation (None: whenever the devices support it, CPU included).
        fused (`bool`, *optional*):
            Use compiled per-tensor kernels for large tensors (see `hf_clinic.optim._fused.fused_by_default` for
            what None does); falls back to foreach with a one-time warning when compilation is unavailable.
        maximize (`bool`, *optional*, defaults to `False`):
            Maximize the objective instead of minimizing it.
        telemetry (`bool`, *optional*, defaults to `True`):
            Keep the last step's trust ratios for `telemetry()` (`lamb/trust_ratio_min|median|max`).

    Raises:
        ValueError: for an invalid hyperparameter, an unknown `preset` or `adapt`.

    Warns:
        LambDegeneratesToAdamWarning: when `adapt="decayed"` and every group has weight decay 0.

    Example:
        ```python
        >>> import torch
        >>> from hf_clinic import Lamb, param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        >>> optimizer = Lamb(param_groups(model, weight_decay=0.01), lr=2e-3)
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> optimizer.step()
        >>> sorted(optimizer.telemetry())
        ['lamb/trust_ratio_max', 'lamb/trust_ratio_median', 'lamb/trust_ratio_min']
        ```

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
        arXiv:1904.00962.
    """

    _state_buffers = ("exp_avg", "exp_avg_sq")
    _algorithm = "lamb"

    @record_explicit_kwargs
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        adapt: str = "decayed",
        max_grad_norm: float | None = None,
        decoupled_weight_decay: bool = False,
        trust_clip: float | None = None,
        preset: str | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        telemetry: bool = True,
    ) -> None:
        check_choice("preset", preset, (None, *LAMB_PRESETS))
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            adapt=adapt,
            max_grad_norm=max_grad_norm,
            decoupled_weight_decay=decoupled_weight_decay,
            trust_clip=trust_clip,
            preset=preset,
            scale_outside_ratio=False,
            ratio_clamp=None,
        )
        explicit = getattr(self, "_explicit_kwargs", frozenset())
        for key, value in LAMB_PRESETS.get(preset, {}).items():
            if key in _PRESET_ONLY_KEYS or key not in explicit:
                defaults[key] = value
        super().__init__(params, defaults, foreach=foreach, fused=fused, maximize=maximize, telemetry=telemetry)
        if all(g["adapt"] == "decayed" and g["weight_decay"] == 0 for g in self.param_groups):
            warnings.warn(
                "Lamb(adapt='decayed') with weight_decay=0 in every param group applies no trust ratio: LAMB "
                "degenerates to Adam. Set a weight decay (e.g. TrainingArguments(weight_decay=0.01)), or "
                "adapt='all' to adapt every layer.",
                LambDegeneratesToAdamWarning,
                stacklevel=3,  # the caller of Lamb(...), past the record_explicit_kwargs wrapper
            )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("adapt", group["adapt"], ADAPT_MODES)
        check_nonnegative("max_grad_norm", group["max_grad_norm"], allow_none=True, strictly_positive=True)
        check_nonnegative("trust_clip", group["trust_clip"], allow_none=True, strictly_positive=True)
        for key in ("bias_correction", "decoupled_weight_decay"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r}; expected a bool")
        if not isinstance(group.get(LAYER_ADAPTATION_KEY, True), bool):
            raise ValueError(f"Invalid {LAYER_ADAPTATION_KEY}: {group[LAYER_ADAPTATION_KEY]!r}; expected a bool")

    def _global_grad_scale(self) -> Tensor | None:
        """max(1, G/max_grad_norm) over every gradient of every group (None when disabled or no grads)."""
        max_grad_norm = self.defaults["max_grad_norm"]
        if max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        norms = []
        for indices in group_by_device_and_dtype(grads).values():
            device_grads = [grads[i] for i in indices]
            if device_grads[0].dtype in LOW_PRECISION_DTYPES:
                device_grads = [x.float() for x in device_grads]
            if any(x.is_sparse for x in device_grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            norms.extend(n.to(grads[0].device) for n in torch._foreach_norm(device_grads))
        total = torch.linalg.vector_norm(torch.stack(norms))
        return (total / max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._global_grad_scale()
        ratios: list[Tensor] = []
        stepped = False
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            stepped = True
            beta1, beta2 = group["betas"]
            group_ratios = lamb(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                grad_scale=grad_scale,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                adapted=is_adapted(group),
                trust_clip=group["trust_clip"],
                ratio_clamp=group["ratio_clamp"],
                scale_outside_ratio=group["scale_outside_ratio"],
                maximize=group["maximize"],
                implementation=self._implementation(group, params),
            )
            ratios.extend(group_ratios)
        if self._telemetry_enabled and stepped:
            self._telemetry_data = {"ratios": ratios}
        return loss

    def _summarize_telemetry(self, data: dict[str, Any]) -> dict[str, float]:
        return trust_ratio_summary("lamb", data["ratios"])


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapted: bool,
    trust_clip: float | None,
    ratio_clamp: tuple[float, float] | None,
    scale_outside_ratio: bool,
    maximize: bool = False,
    implementation: str = "forloop",
) -> list[Tensor]:
    """Functional LAMB over tensor lists; see `Lamb`. Returns the trust ratios applied (tensors, adapted only)."""
    kwargs = dict(
        grad_scale=grad_scale,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        decoupled_weight_decay=decoupled_weight_decay,
        adapted=adapted,
        trust_clip=trust_clip,
        ratio_clamp=ratio_clamp,
        scale_outside_ratio=scale_outside_ratio,
        maximize=maximize,
    )
    if implementation == "fused":
        from ._fused import fused_lamb

        return fused_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, multi_tensor=_multi_tensor_lamb, **kwargs)
    if implementation == "foreach":
        return _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
    return _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)


def trust_ratio(
    param_norm: Tensor, update_norm: Tensor, trust_clip: float | None, ratio_clamp: tuple[float, float] | None
) -> Tensor:
    """‖θ‖/‖u‖, 1 when either norm is 0, optionally clamped (works elementwise on stacked norms)."""
    ratio = torch.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, 1.0)
    if ratio_clamp is not None:
        ratio = ratio.clamp(min=ratio_clamp[0], max=ratio_clamp[1])
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return ratio


def _step_scalars(step: float, beta1: float, beta2: float, bias_correction: bool, scale_outside_ratio: bool):
    """(1−β1^t, sqrt(1−β2^t), outer step scale) for the moments, the denominator and the final step."""
    if not bias_correction:
        return 1.0, 1.0, 1.0
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if scale_outside_ratio:
        # DeepSpeed: raw moments inside, sqrt(1-β2^t)/(1-β1^t) applied to the step, outside the ratio
        return 1.0, 1.0, bias_correction2_sqrt / bias_correction1
    return bias_correction1, bias_correction2_sqrt, 1.0


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapted: bool,
    trust_clip: float | None,
    ratio_clamp: tuple[float, float] | None,
    scale_outside_ratio: bool,
    maximize: bool,
) -> list[Tensor]:
    ratios = []
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        step = step_t.item()
        theta = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
        grad = grad.to(exp_avg.dtype)
        # 1. global pre-normalisation (out of place: p.grad is never written)
        if grad_scale is not None:
            grad = grad / grad_scale.to(grad.dtype)
        if maximize:
            grad = -grad
        # 2. Adam direction
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1, bias_correction2_sqrt, outer_scale = _step_scalars(
            step, beta1, beta2, bias_correction, scale_outside_ratio
        )
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        update = (exp_avg / bias_correction1).div_(denom)
        # 3. weight decay
        if weight_decay != 0:
            if decoupled_weight_decay:
                theta.mul_(1 - lr * weight_decay)
            else:
                update.add_(theta, alpha=weight_decay)
        # 4. trust ratio
        if adapted:
            ratio = trust_ratio(theta.norm(), update.norm(), trust_clip, ratio_clamp)
            update.mul_(ratio)
            ratios.append(ratio)
        # 5. learning rate
        theta.add_(update, alpha=-lr * outer_scale)
        if theta is not param:
            param.copy_(theta)
    return ratios


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapted: bool,
    trust_clip: float | None,
    ratio_clamp: tuple[float, float] | None,
    scale_outside_ratio: bool,
    maximize: bool,
) -> list[Tensor]:
    ratios: list[Tensor] = []
    if not params:
        return ratios
    torch._foreach_add_(state_steps, 1.0)
    for indices in group_by_device_and_dtype(params).values():
        device_params = [params[i] for i in indices]
        low_precision = device_params[0].dtype in LOW_PRECISION_DTYPES
        thetas = [p.float() for p in device_params] if low_precision else device_params
        exp_avg = [exp_avgs[i] for i in indices]
        exp_avg_sq = [exp_avg_sqs[i] for i in indices]
        scalars = [
            _step_scalars(state_steps[i].item(), beta1, beta2, bias_correction, scale_outside_ratio) for i in indices
        ]
        g = [grads[i] for i in indices]
        if low_precision:
            g = [x.float() for x in g]
        # 1. global pre-normalisation (out of place)
        if grad_scale is not None:
            g = torch._foreach_div(g, grad_scale.to(device=g[0].device, dtype=g[0].dtype))
        if maximize:
            g = torch._foreach_neg(g)
        # 2. Adam direction
        torch._foreach_lerp_(exp_avg, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, 1 - beta2)
        del g
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [s[1] for s in scalars])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avg, [s[0] for s in scalars])
        torch._foreach_div_(update, denom)
        del denom
        # 3. weight decay
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(thetas, 1 - lr * weight_decay)
            else:
                torch._foreach_add_(update, thetas, alpha=weight_decay)
        # 4. trust ratios, one vectorised computation for the whole list
        if adapted:
            ratio = trust_ratio(
                torch.stack(torch._foreach_norm(thetas)),
                torch.stack(torch._foreach_norm(update)),
                trust_clip,
                ratio_clamp,
            )
            torch._foreach_mul_(update, list(ratio.unbind(0)))
            ratios.append(ratio)
        # 5. learning rate
        if scale_outside_ratio:
            torch._foreach_mul_(update, [-lr * s[2] for s in scalars])
            torch._foreach_add_(thetas, update)
        else:
            torch._foreach_add_(thetas, update, alpha=-lr)
        if low_precision:
            torch._foreach_copy_(device_params, thetas)
    return ratios
