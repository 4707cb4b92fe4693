"""RAdam: Adam with a rectified (variance-corrected) adaptive learning rate.

References:
    Liyuan Liu, Haoming Jiang, Pengcheng He, Weizhu Chen, Xiaodong Liu, Jianfeng Gao, Jiawei Han,
    "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020, arXiv:1908.03265.
    Official code: LiyuanLucasLiu/RAdam `radam/radam.py` (commit d9fd30a); `torch.optim.RAdam` (torch 2.13).

The three behaviours found in the wild differ only in the first few steps (while the variance of the adaptive lr
is intractable, ρ_t ≤ threshold); here they are two switches:

- `warm_phase="skip"` (default, official code with `degenerated_to_sgd=False`): m and v are updated, the
  parameters and the (decoupled) weight decay are not;
- `warm_phase="sgd"`: an un-adapted momentum-SGD step `lr·m̂_t` (paper Alg. 2, torch). With `rectify_threshold=5`
  and `decoupled_weight_decay=True` this is `torch.optim.RAdam(decoupled_weight_decay=True)`.
- `rectify_threshold=4.0` is the paper's test ρ_t > 4 (first rectified step t=5); 5.0 is the official code/torch
  (first rectified step t=6).

NOTE: the official code tests ρ_t ≥ 5 and torch ρ_t > 5; for every β2 in [0.9, 0.999] ρ_5 < 5 < ρ_6, so both agree
with our ρ_t > threshold.
NOTE: decoupled weight decay is applied exactly on the steps that update the parameters: every step in "sgd" mode
(as torch does), rectified steps only in "skip" mode (as the official code does). Coupled (L2) decay enters the
gradient and so the moments on every step, skipped or not.
NOTE: the official code caches (ρ_t, step size) in `group["buffer"]` and keeps a per-group step in pytorch_optimizer;
we keep a per-parameter step (`state["step"]`), so a parameter that first receives a gradient late starts at t=1.
NOTE: `pytorch_optimizer.RAdam(weight_decouple=False)` silently drops weight decay; here coupled decay is real L2.
NOTE: the fused path runs rectified steps in ATen's fused Adam(W) kernels (`torch._fused_adamw_`) with a step size
of lr·r_t·sqrt(1−β2^t)/(1−β1^t) and a step count large enough that their own bias corrections are exactly 1; the
result equals the for-loop path to float rounding (tested over 50 steps).
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
    check_choice,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
)


__all__ = ["RAdam", "radam"]

WARM_PHASES = ("skip", "sgd")


def rectification(step: float, beta2: float, rectify_threshold: float) -> tuple[float, float | None]:
    """ρ_t and the rectification term r_t at step `step` (r_t is None while ρ_t ≤ threshold)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t <= rectify_threshold:
        return rho_t, None
    rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
    return rho_t, rect


class RAdam(ClinicOptimizer):
    r"""RAdam (Liu et al., 2020): Adam whose adaptive learning rate is switched on only once its variance is tractable.

    Adam's adaptive learning rate has a large variance in the first steps, which is why Adam needs a warm-up. RAdam
    estimates the length ρ_t of the approximated simple moving average behind v_t; while ρ_t is too short the
    adaptive term is not used, afterwards it is multiplied by the rectification term r_t. The update, per parameter
    tensor at step t (per-parameter step), in the paper's order:

    1. `add_decayed_weights` (coupled): g ← g + λθ (if `decoupled_weight_decay=False`);
    2. `ema` of g and g²: m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
    3. `length of the SMA`: ρ∞ = 2/(1−β2) − 1;  ρ_t = ρ∞ − 2tβ2^t/(1−β2^t);
    4. if ρ_t > `rectify_threshold`: `scale_by_rectified_adam`:
       r_t = sqrt((ρ_t−4)(ρ_t−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρ_t));  u = r_t · m̂ · sqrt(1−β2^t) / (sqrt(v) + ε)
       with m̂ = m/(1−β1^t); otherwise u = m̂ (`warm_phase="sgd"`) or no update at all (`warm_phase="skip"`);
    5. `decoupled decay` (if `decoupled_weight_decay=True`, on steps that update θ): θ ← (1 − lr·λ) θ;
    6. `scale_by_learning_rate`: θ ← θ − lr · u.

    ε is added to sqrt of the *uncorrected* v, as in the official code and torch.

    Args:
        params (`iterable`):
            Parameters or param groups (dicts) to optimize.
        lr (`float`, *optional*, defaults to `1e-3`):
            Learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            β1, β2 of the moment EMAs, each in [0, 1).
        eps (`float`, *optional*, defaults to `1e-8`):
            Added to sqrt(v) for numerical stability.
        weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay λ.
        decoupled_weight_decay (`bool`, *optional*, defaults to `True`):
            AdamW-style decay θ ← (1 − lr·λ)θ (the paper's experiments and the official code) instead of L2 decay
            added to the gradient.
        rectify_threshold (`float`, *optional*, defaults to `5.0`):
            Rectify when ρ_t > threshold; 5.0 = official code/torch (first rectified step t=6), 4.0 = paper (t=5).
            Must be ≥ 4 (r_t is undefined below).
        warm_phase (`str`, *optional*, defaults to `"skip"`):
            What happens while ρ_t ≤ threshold: `"skip"` (official default: moments only, no parameter or decay
            update) or `"sgd"` (momentum-SGD step lr·m̂, as in the paper and torch).
        foreach (`bool`, *optional*):
            Use the `torch._foreach_*` implementation. None picks it whenever every parameter is on a device with
            foreach kernels (CPU included: it is faster than the for-loop there too).
        fused (`bool`, *optional*):
            Rectified steps run in ATen's fused Adam(W) kernel (a rectified RAdam step is an Adam step with step
            size lr·r_t·sqrt(1−β2^t)/(1−β1^t); no compilation), bf16/fp16 parameters with float32 state in a
            compiled per-tensor kernel, the warm phase on foreach. None enables it whenever no compilation is
            needed (float32/float64 parameters on CPU or CUDA: the default there), otherwise as
            `hf_clinic.optim._fused.fused_by_default`.
        maximize (`bool`, *optional*, defaults to `False`):
            Maximize the objective instead of minimizing it.
        telemetry (`bool`, *optional*, defaults to `True`):
            Keep the last step's ρ_t for `telemetry()`.

    Telemetry: `radam/rho_t`, `radam/rectification` (r_t, 0 while not rectified) and `radam/rectified` (1.0 or
    0.0) for the step count of the most recently updated parameter.

    Example:
        ```python
        >>> import torch
        >>> from hf_clinic import RAdam
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = RAdam(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> optimizer.step()
        ```

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020, arXiv:1908.03265.
    """

    _state_buffers = ("exp_avg", "exp_avg_sq")
    _algorithm = "radam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        rectify_threshold: float = 5.0,
        warm_phase: str = "skip",
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
            rectify_threshold=rectify_threshold,
            warm_phase=warm_phase,
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused, maximize=maximize, telemetry=telemetry)

    def _fused_by_default(self, params) -> bool:
        from ._fused import radam_fused_by_default

        return radam_fused_by_default(params)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if not isinstance(group["decoupled_weight_decay"], bool):
            raise ValueError(f"Invalid decoupled_weight_decay: {group['decoupled_weight_decay']!r}; expected a bool")
        threshold = group["rectify_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 4.0:
            raise ValueError(f"Invalid rectify_threshold value: {threshold}; must be >= 4 (r_t is undefined below)")
        check_choice("warm_phase", group["warm_phase"], WARM_PHASES)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        last_step = None
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            radam(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                rectify_threshold=group["rectify_threshold"],
                warm_phase=group["warm_phase"],
                maximize=group["maximize"],
                implementation=self._implementation(group, params),
            )
            last_step = (states[-1]["step"], beta2, group["rectify_threshold"])
        if self._telemetry_enabled and last_step is not None:
            self._telemetry_data = {"step": last_step}
        return loss

    def _summarize_telemetry(self, data: dict[str, Any]) -> dict[str, float]:
        step, beta2, threshold = data["step"]
        rho_t, rect = rectification(step.item(), beta2, threshold)
        return {
            "radam/rho_t": rho_t,
            "radam/rectification": 0.0 if rect is None else rect,
            "radam/rectified": 0.0 if rect is None else 1.0,
        }


def radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    rectify_threshold: float,
    warm_phase: str,
    maximize: bool = False,
    implementation: str = "forloop",
) -> None:
    """Functional RAdam over tensor lists; see `RAdam` for the algorithm. Increments `state_steps` in place."""
    kwargs = dict(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        decoupled_weight_decay=decoupled_weight_decay,
        rectify_threshold=rectify_threshold,
        warm_phase=warm_phase,
        maximize=maximize,
    )
    if implementation == "fused":
        from ._fused import fused_radam

        fused_radam(params, grads, exp_avgs, exp_avg_sqs, state_steps, multi_tensor=_multi_tensor_radam, **kwargs)
    elif implementation == "foreach":
        _multi_tensor_radam(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
    else:
        _single_tensor_radam(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)


def _single_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    rectify_threshold: float,
    warm_phase: str,
    maximize: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        step = step_t.item()
        # bf16/fp16 params: do the maths on an fp32 copy and write it back once
        theta = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
        grad = grad.to(exp_avg.dtype)
        if maximize:
            grad = -grad

        # 1. coupled (L2) weight decay
        if weight_decay != 0 and not decoupled_weight_decay:
            grad = grad.add(theta, alpha=weight_decay)
        # 2. moment EMAs
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # 3. length of the approximated SMA, 4. rectification
        bias_correction1 = 1 - beta1**step
        _, rect = rectification(step, beta2, rectify_threshold)
        if rect is None and warm_phase == "skip":
            continue
        # 5. decoupled weight decay, on the steps that update the parameters
        if weight_decay != 0 and decoupled_weight_decay:
            theta.mul_(1 - lr * weight_decay)
        # 6. the step
        if rect is not None:
            step_size = lr * rect * math.sqrt(1 - beta2**step) / bias_correction1
            theta.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)
        else:
            theta.add_(exp_avg, alpha=-lr / bias_correction1)
        if theta is not param:
            param.copy_(theta)


def _multi_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    rectify_threshold: float,
    warm_phase: str,
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
        steps = [state_steps[i].item() for i in indices]
        g = [grads[i] for i in indices]
        if low_precision:
            g = [x.float() for x in g]
        if maximize:
            g = torch._foreach_neg(g)

        # 1. coupled (L2) weight decay
        if weight_decay != 0 and not decoupled_weight_decay:
            g = torch._foreach_add(g, thetas, alpha=weight_decay)
        # 2. moment EMAs
        torch._foreach_lerp_(exp_avg, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, 1 - beta2)
        del g
        # 3./4. per-tensor rectification (steps may differ between tensors)
        rects = [rectification(step, beta2, rectify_threshold)[1] for step in steps]
        rectified = [i for i, r in enumerate(rects) if r is not None]
        warm = [] if warm_phase == "skip" else [i for i, r in enumerate(rects) if r is None]
        updated = rectified + warm
        if not updated:
            continue
        # 5. decoupled weight decay, on the steps that update the parameters
        if weight_decay != 0 and decoupled_weight_decay:
            torch._foreach_mul_([thetas[i] for i in updated], 1 - lr * weight_decay)
        # 6. the steps
        if rectified:
            denom = torch._foreach_sqrt([exp_avg_sq[i] for i in rectified])
            torch._foreach_add_(denom, eps)
            step_sizes = [
                -lr * rects[i] * math.sqrt(1 - beta2 ** steps[i]) / (1 - beta1 ** steps[i]) for i in rectified
            ]
            torch._foreach_addcdiv_([thetas[i] for i in rectified], [exp_avg[i] for i in rectified], denom, step_sizes)
            del denom
        if warm:
            sgd_steps = [-lr / (1 - beta1 ** steps[i]) for i in warm]
            warm_updates = torch._foreach_mul([exp_avg[i] for i in warm], sgd_steps)
            torch._foreach_add_([thetas[i] for i in warm], warm_updates)
        if low_precision:
            torch._foreach_copy_([device_params[i] for i in updated], [thetas[i] for i in updated])
