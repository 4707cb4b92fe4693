"""LARS: layer-wise adaptive rate scaling for large-batch SGD with momentum (and LARC, its clipped form).

References:
    Yang You, Igor Gitman, Boris Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888
    (Alg. 1, "SGD with LARS"). Implementations compared: MLPerf ResNet-50 TF2 `LARSOptimizer`, `optax.lars`,
    timm `Lars`, NVIDIA apex `LARC`, pytorch_optimizer `LARS`.

NOTE: `lr_in_momentum=True` (default) folds the learning rate into the momentum buffer as the paper, MLPerf and optax
do: v ← μv + lr·λ_l·d, θ ← θ − v. `lr_in_momentum=False` is the torch-SGD/timm form buf ← μ·buf + d,
θ ← θ − lr·buf. Both agree at constant lr and differ under a schedule.
NOTE: the first momentum step copies the update into the buffer (torch SGD/timm); with `dampening=0` this equals the
paper's zero-initialised buffer.
NOTE: the zero-norm guard (ratio 1 when ‖θ‖ = 0 or ‖g‖ = 0) follows timm/optax; pytorch_optimizer hard-codes
"ndim ≤ 1 ⇒ no decay, no adaptation" and writes into `p.grad`. Here exclusion is by param group
(`layer_adaptation=False` from `hf_clinic.param_groups`) and `p.grad` is never written.
NOTE: MLPerf's TF `LARSOptimizer` silently turns `epsilon=0.0` into 1e-7; here `eps=0.0` means 0.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._base import (
    LAYER_ADAPTATION_KEY,
    LOW_PRECISION_DTYPES,
    ClinicOptimizer,
    check_choice,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
    trust_ratio_summary,
)


__all__ = ["Lars", "LarsDegeneratesToSGDWarning", "lars"]

ADAPT_MODES = ("decayed", "all", "none")
TRUST_NORMS = ("sum_of_norms", "norm_of_sum")
CLIP_MODES = (None, "larc")


class LarsDegeneratesToSGDWarning(UserWarning):
    """`adapt="decayed"` with weight decay 0 in every group: no layer gets a local lr, LARS is momentum SGD."""


def is_adapted(group: dict[str, Any]) -> bool:
    if not group.get(LAYER_ADAPTATION_KEY, True):
        return False
    adapt = group["adapt"]
    return adapt == "all" or (adapt == "decayed" and group["weight_decay"] != 0)


class Lars(ClinicOptimizer):
    r"""LARS (You, Gitman, Ginsburg, 2017): momentum SGD with a per-layer local learning rate η‖θ‖/(‖g‖+λ‖θ‖).

    With very large batches the ratio ‖g‖/‖θ‖ varies by orders of magnitude between layers, so one global learning
    rate diverges on some layers and crawls on others. LARS gives every layer a local learning rate proportional to
    ‖θ‖/‖g‖. The update, per parameter tensor (layer), in the paper's order:

    1. `add_decayed_weights`: d = g + λθ;
    2. `scale_by_trust_ratio` (adapted groups only): λ_l = η‖θ‖ / (‖g‖ + λ‖θ‖ + ε) (`trust_norm="sum_of_norms"`,
       paper/timm/MLPerf) or η‖θ‖ / (‖g + λθ‖ + ε) (`"norm_of_sum"`, optax); λ_l = 1 when ‖θ‖ or the gradient
       norm is 0; LARC (`clip_mode="larc"`): λ_l ← min(λ_l/lr, 1); d ← λ_l·d;
    3. `scale_by_learning_rate` and `trace` (momentum μ, dampening δ):
       `lr_in_momentum=True`: v ← μv + (1−δ)·lr·d; θ ← θ − v (Nesterov: θ ← θ − (lr·d + μv));
       `lr_in_momentum=False`: v ← μv + (1−δ)·d; θ ← θ − lr·v (Nesterov: θ ← θ − lr·(d + μv)).

    A group is adapted when its `layer_adaptation` key (default True) is True and `adapt` is "all", or
    "decayed" and its weight decay ≠ 0. `hf_clinic.param_groups` puts biases and norm gains in a group with
    `layer_adaptation=False` and no weight decay (MLPerf's skip list).

    Args:
        params (`iterable`):
            Parameters or param groups (dicts) to optimize. A group may set `layer_adaptation=False`.
        lr (`float`):
            Base learning rate γ (MLPerf ResNet-50 uses ~10 with a poly-2 schedule).
        momentum (`float`, *optional*, defaults to `0.9`):
            Momentum μ; 0 keeps no buffer.
        dampening (`float`, *optional*, defaults to `0.0`):
            Dampening δ of the momentum.
        nesterov (`bool`, *optional*, defaults to `False`):
            Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay λ (coupled, inside the ratio's denominator).
        trust_coefficient (`float`, *optional*, defaults to `1e-3`):
            LARS coefficient η.
        eps (`float`, *optional*, defaults to `0.0`):
            Added to the ratio's denominator.
        lr_in_momentum (`bool`, *optional*, defaults to `True`):
            Fold lr into the momentum buffer (paper, MLPerf, optax) or apply it after (timm, torch SGD).
        trust_norm (`str`, *optional*, defaults to `"sum_of_norms"`):
            `"sum_of_norms"` ‖g‖ + λ‖θ‖ or `"norm_of_sum"` ‖g + λθ‖ (optax).
        clip_mode (`str`, *optional*):
            None or `"larc"` (LARC: the local lr λ_l·lr never exceeds lr).
        adapt (`str`, *optional*, defaults to `"decayed"`):
            Which groups get the ratio: `"decayed"` (weight decay ≠ 0), `"all"` or `"none"`.
        foreach (`bool`, *optional*):
            Use the `torch._foreach_*` implementation (None: whenever the devices support it, CPU included).
        fused (`bool`, *optional*):
            Compiled per-tensor kernels for large tensors (see `hf_clinic.optim._fused.fused_by_default`).
        maximize (`bool`, *optional*, defaults to `False`):
            Maximize the objective instead of minimizing it.
        telemetry (`bool`, *optional*, defaults to `True`):
            Keep the last step's local learning rates for `telemetry()` (`lars/trust_ratio_min|median|max`).

    Warns:
        LarsDegeneratesToSGDWarning: when `adapt="decayed"` and every group has weight decay 0 (the default
        `weight_decay=0.0`): pass a weight decay or `adapt="all"`.

    Example:
        ```python
        >>> import torch
        >>> from hf_clinic import Lars, param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> optimizer = Lars(param_groups(model, weight_decay=1e-4), lr=1.0)
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> optimizer.step()
        ```

    References:
        You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888.
    """

    _state_buffers = ("momentum_buffer",)
    _algorithm = "lars"

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
        lr_in_momentum: bool = True,
        trust_norm: str = "sum_of_norms",
        clip_mode: str | None = None,
        adapt: str = "decayed",
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        telemetry: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lr_in_momentum=lr_in_momentum,
            trust_norm=trust_norm,
            clip_mode=clip_mode,
            adapt=adapt,
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused, maximize=maximize, telemetry=telemetry)
        if all(g["adapt"] == "decayed" and g["weight_decay"] == 0 for g in self.param_groups):
            warnings.warn(
                "Lars(adapt='decayed') with weight_decay=0 in every param group applies no trust ratio: LARS "
                "degenerates to momentum SGD. Set a weight decay (MLPerf uses 1e-4 to 2e-4), or adapt='all'.",
                LarsDegeneratesToSGDWarning,
                stacklevel=2,
            )

    def _state_buffer_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        # no buffer at all without momentum (state = exactly the theoretical size)
        return self._state_buffers if group["momentum"] != 0 else ()

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_nonnegative("momentum", group["momentum"])
        if group["momentum"] >= 1.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}; must be in [0, 1)")
        check_nonnegative("dampening", group["dampening"])
        if group["dampening"] > 1.0:
            raise ValueError(f"Invalid dampening value: {group['dampening']}; must be in [0, 1]")
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("trust_coefficient", group["trust_coefficient"], strictly_positive=True)
        check_nonnegative("epsilon", group["eps"])
        for key in ("nesterov", "lr_in_momentum"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r}; expected a bool")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )
        check_choice("trust_norm", group["trust_norm"], TRUST_NORMS)
        check_choice("clip_mode", group["clip_mode"], CLIP_MODES)
        check_choice("adapt", group["adapt"], ADAPT_MODES)
        if not isinstance(group.get(LAYER_ADAPTATION_KEY, True), bool):
            raise ValueError(f"Invalid {LAYER_ADAPTATION_KEY}: {group[LAYER_ADAPTATION_KEY]!r}; expected a bool")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ratios: list[Tensor] = []
        stepped = False
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            stepped = True
            momentum = group["momentum"]
            group_ratios = lars(
                params,
                grads,
                [s["momentum_buffer"] for s in states] if momentum != 0 else None,
                [s["step"] for s in states],
                lr=group["lr"],
                momentum=momentum,
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                lr_in_momentum=group["lr_in_momentum"],
                trust_norm=group["trust_norm"],
                clip_mode=group["clip_mode"],
                adapted=is_adapted(group),
                maximize=group["maximize"],
                implementation=self._implementation(group, params),
            )
            ratios.extend(group_ratios)
        if self._telemetry_enabled and stepped:
            self._telemetry_data = {"ratios": ratios}
        return loss

    def _summarize_telemetry(self, data: dict[str, Any]) -> dict[str, float]:
        return trust_ratio_summary("lars", data["ratios"])


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lr_in_momentum: bool,
    trust_norm: str,
    clip_mode: str | None,
    adapted: bool,
    maximize: bool = False,
    implementation: str = "forloop",
) -> list[Tensor]:
    """Functional LARS over tensor lists; see `Lars`. Returns the local learning rates λ_l applied (adapted only)."""
    kwargs = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        lr_in_momentum=lr_in_momentum,
        trust_norm=trust_norm,
        clip_mode=clip_mode,
        adapted=adapted,
        maximize=maximize,
    )
    if implementation == "fused":
        from ._fused import fused_lars

        return fused_lars(params, grads, momentum_buffers, state_steps, multi_tensor=_multi_tensor_lars, **kwargs)
    if implementation == "foreach":
        return _multi_tensor_lars(params, grads, momentum_buffers, state_steps, **kwargs)
    return _single_tensor_lars(params, grads, momentum_buffers, state_steps, **kwargs)


def local_lr(
    param_norm: Tensor,
    grad_norm: Tensor,
    denom: Tensor,
    *,
    lr: float,
    trust_coefficient: float,
    clip_mode: str | None,
) -> Tensor:
    """η‖θ‖/denom with the zero-norm guard (1 when ‖θ‖ or the gradient norm is 0), LARC-clipped if asked."""
    ratio = torch.where((param_norm > 0) & (grad_norm > 0), trust_coefficient * param_norm / denom, 1.0)
    if clip_mode == "larc":
        ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
    return ratio


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lr_in_momentum: bool,
    trust_norm: str,
    clip_mode: str | None,
    adapted: bool,
    maximize: bool,
) -> list[Tensor]:
    ratios = []
    for i, (param, grad, step_t) in enumerate(zip(params, grads, state_steps, strict=True)):
        step_t += 1
        theta = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
        grad = grad.to(theta.dtype)
        if maximize:
            grad = -grad
        # 1. weight decay (coupled)
        update = grad.add(theta, alpha=weight_decay) if weight_decay != 0 else grad.clone()
        # 2. trust ratio
        if adapted:
            param_norm = theta.norm()
            if trust_norm == "sum_of_norms":
                grad_norm = grad.norm()
                denom = grad_norm + weight_decay * param_norm + eps
            else:
                grad_norm = update.norm()
                denom = grad_norm + eps
            ratio = local_lr(
                param_norm, grad_norm, denom, lr=lr, trust_coefficient=trust_coefficient, clip_mode=clip_mode
            )
            update.mul_(ratio)
            ratios.append(ratio)
        # 3. learning rate and momentum
        if lr_in_momentum:
            update.mul_(lr)
        if momentum != 0:
            buf = momentum_buffers[i]
            if step_t.item() == 1:
                buf.copy_(update)
            else:
                buf.mul_(momentum).add_(update, alpha=1 - dampening)
            if nesterov:
                update.add_(buf, alpha=momentum)
            else:
                update = buf
        theta.add_(update, alpha=-1.0 if lr_in_momentum else -lr)
        if theta is not param:
            param.copy_(theta)
    return ratios


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lr_in_momentum: bool,
    trust_norm: str,
    clip_mode: str | None,
    adapted: bool,
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
        g = [grads[i].to(thetas[0].dtype) for i in indices]
        if maximize:
            g = torch._foreach_neg(g)
        # 1. weight decay (coupled)
        update = torch._foreach_add(g, thetas, alpha=weight_decay) if weight_decay != 0 else torch._foreach_mul(g, 1.0)
        # 2. trust ratios, vectorised over the list
        if adapted:
            param_norm = torch.stack(torch._foreach_norm(thetas))
            if trust_norm == "sum_of_norms":
                grad_norm = torch.stack(torch._foreach_norm(g))
                denom = grad_norm + weight_decay * param_norm + eps
            else:
                grad_norm = torch.stack(torch._foreach_norm(update))
                denom = grad_norm + eps
            ratio = local_lr(
                param_norm, grad_norm, denom, lr=lr, trust_coefficient=trust_coefficient, clip_mode=clip_mode
            )
            torch._foreach_mul_(update, list(ratio.unbind(0)))
            ratios.append(ratio)
        del g
        # 3. learning rate and momentum
        if lr_in_momentum:
            torch._foreach_mul_(update, lr)
        if momentum != 0:
            bufs = [momentum_buffers[i] for i in indices]
            first = [j for j, i in enumerate(indices) if state_steps[i].item() == 1]
            later = [j for j in range(len(indices)) if state_steps[indices[j]].item() != 1] if first else None
            # Once per tensor, so a plain loop: DTensor (FSDP2) has no `_foreach_copy_`.
            for j in first:
                bufs[j].copy_(update[j])
            if later is None:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, update, alpha=1 - dampening)
            elif later:
                torch._foreach_mul_([bufs[j] for j in later], momentum)
                torch._foreach_add_([bufs[j] for j in later], [update[j] for j in later], alpha=1 - dampening)
            if nesterov:
                torch._foreach_add_(update, bufs, alpha=momentum)
            else:
                update = bufs
        torch._foreach_add_(thetas, update, alpha=-1.0 if lr_in_momentum else -lr)
        if low_precision:
            torch._foreach_copy_(device_params, thetas)
    return ratios
