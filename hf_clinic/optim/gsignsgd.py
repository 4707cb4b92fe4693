"""Generalized SignSGD: Adam whose second moment tracks the momentum, robust to unbounded smoothness.

References:
    Michael Crawshaw, Mingrui Liu, Francesco Orabona, Wei Zhang, Zhenxun Zhuang, "Robustness to Unbounded
    Smoothness of Generalized SignSGD", NeurIPS 2022, arXiv:2208.11195.
    Authors' code: zhenxun-zhuang/Generalized-SignSGD `*/generalized_signsgd.py` (commit 3105b7e).

NOTE: with `eps=0` the update m̂/sqrt(v̂) is 0/0 when m = v = 0 (e.g. the first step of a zero gradient); the
authors' code returns NaN there, we take a zero step (and sign(m) should v underflow to 0 while m ≠ 0), which keeps
β2 = 0, eps = 0 exactly Signum.
NOTE: `decoupled_weight_decay=True` (θ ← (1 − lr·λ)θ) is an addition; the authors use coupled L2 decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import (
    LOW_PRECISION_DTYPES,
    ClinicOptimizer,
    check_betas,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
)


__all__ = ["GeneralizedSignSGD", "gsignsgd"]


class GeneralizedSignSGD(ClinicOptimizer):
    r"""Generalized SignSGD (Crawshaw et al., 2022): m / sqrt(EMA of m²), interpolating Signum and Adam.

    Under (L0, L1)-smoothness, which Transformers exhibit, plain SGD needs clipping to converge; a sign-like update
    with momentum is robust without it. The method is Adam with the second moment taken on the *momentum*: with
    β2 = 0 and ε = 0 it is exactly Signum (sign of an EMA momentum), with β2 → 1 it behaves like Adam. The update,
    per parameter tensor at step t, in the paper's order:

    1. `add_decayed_weights` (coupled, the authors' choice): g ← g + λθ (or, decoupled, θ ← (1 − lr·λ)θ);
    2. `ema` of g: m ← β1 m + (1−β1) g;
    3. `ema` of m²: v ← β2 v + (1−β2) m²;
    4. `bias correction` (optional, off by default as in the authors' runs): m̂ = m/(1−β1^t), v̂ = v/(1−β2^t);
    5. `scale_by_learning_rate`: θ ← θ − lr · m̂ / (sqrt(v̂) + ε).

    Args:
        params (`iterable`):
            Parameters or param groups (dicts) to optimize.
        lr (`float`, *optional*, defaults to `1e-3`):
            Learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            β1 (momentum) and β2 (EMA of m²), each in [0, 1). The authors' Transformer recipe uses (0.9, 0.98).
        eps (`float`, *optional*, defaults to `1e-8`):
            Added to sqrt(v̂); 0 is allowed (0/0 is a zero step).
        weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay λ.
        decoupled_weight_decay (`bool`, *optional*, defaults to `False`):
            Decay θ directly instead of adding λθ to the gradient.
        bias_correction (`bool`, *optional*, defaults to `False`):
            Bias-correct m and v.
        foreach (`bool`, *optional*):
            Use the `torch._foreach_*` implementation (None: whenever the devices support it, CPU included).
        fused (`bool`, *optional*):
            Compiled per-tensor kernels for large tensors (see `hf_clinic.optim._fused.fused_by_default`).
        maximize (`bool`, *optional*, defaults to `False`):
            Maximize the objective instead of minimizing it.
        telemetry (`bool`, *optional*, defaults to `True`):
            Accepted for a uniform API; Generalized SignSGD has no diagnostics, `telemetry()` returns `{}`.

    Example:
        ```python
        >>> import torch
        >>> from hf_clinic import GeneralizedSignSGD
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = GeneralizedSignSGD(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> optimizer.step()
        ```

    References:
        Crawshaw et al., "Robustness to Unbounded Smoothness of Generalized SignSGD", NeurIPS 2022,
        arXiv:2208.11195.
    """

    _state_buffers = ("exp_avg", "exp_avg_sq")
    _algorithm = "gsignsgd"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        bias_correction: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        telemetry: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused, maximize=maximize, telemetry=telemetry)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        for key in ("decoupled_weight_decay", "bias_correction"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r}; expected a bool")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            gsignsgd(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                bias_correction=group["bias_correction"],
                maximize=group["maximize"],
                implementation=self._implementation(group, params),
            )
        return loss

    def telemetry(self) -> dict[str, float]:
        """Generalized SignSGD has no diagnostics: always `{}`."""
        return {}


def gsignsgd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    bias_correction: bool,
    maximize: bool = False,
    implementation: str = "forloop",
) -> None:
    """Functional Generalized SignSGD over tensor lists; see `GeneralizedSignSGD`."""
    kwargs = dict(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        bias_correction=bias_correction,
        maximize=maximize,
    )
    if implementation == "fused":
        from ._fused import fused_gsignsgd

        fused_gsignsgd(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, multi_tensor=_multi_tensor_gsignsgd, **kwargs
        )
    elif implementation == "foreach":
        _multi_tensor_gsignsgd(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
    else:
        _single_tensor_gsignsgd(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)


def _bias_corrections(step: float, beta1: float, beta2: float, bias_correction: bool) -> tuple[float, float]:
    if not bias_correction:
        return 1.0, 1.0
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def _single_tensor_gsignsgd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    bias_correction: bool,
    maximize: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        theta = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
        grad = grad.to(exp_avg.dtype)
        if maximize:
            grad = -grad
        # 1. weight decay
        if weight_decay != 0:
            if decoupled_weight_decay:
                theta.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(theta, alpha=weight_decay)
        # 2. momentum, 3. EMA of the squared momentum
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(exp_avg, exp_avg, value=1 - beta2)
        # 4. bias correction, 5. step
        bias_correction1, bias_correction2_sqrt = _bias_corrections(step_t.item(), beta1, beta2, bias_correction)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        update = (exp_avg / bias_correction1).div_(denom)
        if eps == 0:
            # 0/0 guard: m = v = 0 gives a zero step; an underflowed v with m != 0 gives sign(m)
            update = torch.where(denom > 0, update, exp_avg.sign())
        theta.add_(update, alpha=-lr)
        if theta is not param:
            param.copy_(theta)


def _multi_tensor_gsignsgd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    bias_correction: bool,
    maximize: bool,
) -> None:
    if not params:
        return
    torch._foreach_add_(state_steps, 1.0)
    for indices in group_by_device_and_dtype(params).values():
        device_params = [params[i] for i in indices]
        low_precision = device_params[0].dtype in LOW_PRECISION_DTYPES
        thetas = [p.float() for p in device_params] if low_precision else device_params
        exp_avg = [exp_avgs[i] for i in indices]
        exp_avg_sq = [exp_avg_sqs[i] for i in indices]
        corrections = [_bias_corrections(state_steps[i].item(), beta1, beta2, bias_correction) for i in indices]
        g = [grads[i] for i in indices]
        if low_precision:
            g = [x.float() for x in g]
        if maximize:
            g = torch._foreach_neg(g)
        # 1. weight decay
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(thetas, 1 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, thetas, alpha=weight_decay)
        # 2. momentum, 3. EMA of the squared momentum
        torch._foreach_lerp_(exp_avg, g, 1 - beta1)
        del g
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, exp_avg, exp_avg, 1 - beta2)
        # 4. bias correction, 5. step
        denom = torch._foreach_sqrt(exp_avg_sq)
        if bias_correction:
            torch._foreach_div_(denom, [c[1] for c in corrections])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avg, [c[0] for c in corrections]) if bias_correction else exp_avg
        update = torch._foreach_div(update, denom)
        if eps == 0:
            update = [torch.where(d > 0, u, m.sign()) for d, u, m in zip(denom, update, exp_avg, strict=True)]
        torch._foreach_add_(thetas, update, alpha=-lr)
        if low_precision:
            torch._foreach_copy_(device_params, thetas)
