"""Float64 references for the optimizer tests, written from the papers' pseudo-code and the reference implementations'
documented update rules (../shared/design/optimizers.md §1-4), never from hf_clinic's code.

Each reference is deliberately naive: one tensor at a time, out-of-place formulas in the paper's notation, Python
loops. `grad_fn(t, params)` returns the gradients at step t (1-based) for the current parameters, so a reference and
an optimizer run on the same deterministic problem. Every function returns `(params, state)` after `steps` steps.
"""

from __future__ import annotations

import math

import torch


def make_problem(shapes, *, seed=0, dtype=torch.float64, scale=1.0):
    """Initial parameters and a deterministic gradient function g_t(θ) = 0.5·θ + noise_t (noise fixed per t)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=dtype) * scale for s in shapes]
    noises = {}

    def grad_fn(t, thetas):
        if t not in noises:
            g = torch.Generator().manual_seed(1000 + t)
            noises[t] = [torch.randn(s, generator=g, dtype=dtype) * (1.0 + (t % 3)) for s in shapes]
        return [0.5 * theta.to(dtype) + n for theta, n in zip(thetas, noises[t], strict=True)]

    return params, grad_fn


def run_optimizer(optimizer_factory, params0, grad_fn, steps, *, lr_schedule=None):
    """Drive an optimizer on the problem; returns (params, optimizer)."""
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    optimizer = optimizer_factory(params)
    for t in range(1, steps + 1):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(t)
        grads = grad_fn(t, [p.detach() for p in params])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype).clone()
        optimizer.step()
    return params, optimizer


# ------------------------------------------------------------------------------------------------ RAdam


def radam_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled, threshold, warm_phase):
    """Liu et al. 2020, Alg. 2; ε as in the official code: l_t = sqrt(1−β2^t)/(sqrt(v_t)+ε).

    Decoupled decay θ ← θ − lr·λ·θ on the steps that update θ ('skip': rectified steps only, official code);
    coupled decay g ← g + λθ.
    """
    theta = [p.clone() for p in params0]
    m = [torch.zeros_like(p) for p in params0]
    v = [torch.zeros_like(p) for p in params0]
    rho_inf = 2 / (1 - beta2) - 1
    for t in range(1, steps + 1):
        g = grad_fn(t, theta)
        for i in range(len(theta)):
            gi = g[i] + weight_decay * theta[i] if (weight_decay and not decoupled) else g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            m_hat = m[i] / (1 - beta1**t)
            rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            decay = lr * weight_decay * theta[i] if decoupled else 0.0
            if rho_t > threshold:
                l_t = math.sqrt(1 - beta2**t) / (torch.sqrt(v[i]) + eps)
                r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                theta[i] = theta[i] - decay - lr * r_t * m_hat * l_t
            elif warm_phase == "sgd":
                theta[i] = theta[i] - decay - lr * m_hat
    return theta, {"exp_avg": m, "exp_avg_sq": v}


# ------------------------------------------------------------------------------------------------ LAMB


def _trust(w_norm, u_norm):
    return w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0


def lamb_paper_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay, adapt, bias_correction=True):
    """You et al. 2020, Alg. 2 (v5), φ = identity: u = m̂/(sqrt(v̂)+ε) + λx; x ← x − η·‖x‖/‖u‖·u.

    `weight_decay` and `adapt` are per tensor (lists): `adapt[i]` False skips the ratio (the MLPerf exclusion list).
    """
    x = [p.clone() for p in params0]
    m = [torch.zeros_like(p) for p in params0]
    v = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, x)
        for i in range(len(x)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            r = m_hat / (torch.sqrt(v_hat) + eps)
            u = r + weight_decay[i] * x[i]
            ratio = _trust(x[i].norm().item(), u.norm().item()) if adapt[i] else 1.0
            x[i] = x[i] - lr * ratio * u
    return x, {"exp_avg": m, "exp_avg_sq": v}


def lamb_global_clip_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay, max_grad_norm, adapt):
    """apex FusedLAMB / timm Lamb: g ← g / c with c = G/max_grad_norm if G > max_grad_norm else 1 (G: global norm),
    then the paper's update; the ratio applies where `adapt[i]` (apex: use_nvlamb or λ≠0; timm: always_adapt or
    λ≠0) and both norms are non-zero."""
    x = [p.clone() for p in params0]
    m = [torch.zeros_like(p) for p in params0]
    v = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, x)
        global_norm = math.sqrt(sum(gi.pow(2).sum().item() for gi in g))
        c = global_norm / max_grad_norm if global_norm > max_grad_norm else 1.0
        for i in range(len(x)):
            gi = g[i] / c
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            u = (m[i] / (1 - beta1**t)) / (torch.sqrt(v[i] / (1 - beta2**t)) + eps) + weight_decay[i] * x[i]
            ratio = _trust(x[i].norm().item(), u.norm().item()) if adapt[i] else 1.0
            x[i] = x[i] - lr * ratio * u
    return x, {"exp_avg": m, "exp_avg_sq": v}


def lamb_deepspeed_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay):
    """DeepSpeed FusedLamb: raw moments, u = m/(sqrt(v)+ε) + λp, coeff = clamp(‖p‖/‖u‖, 0.01, 10) (1 if a norm is 0),
    p ← p − lr·sqrt(1−β2^t)/(1−β1^t)·coeff·u."""
    p = [q.clone() for q in params0]
    m = [torch.zeros_like(q) for q in params0]
    v = [torch.zeros_like(q) for q in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, p)
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for i in range(len(p)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
            u = m[i] / (torch.sqrt(v[i]) + eps) + weight_decay * p[i]
            w_norm, u_norm = p[i].norm().item(), u.norm().item()
            coeff = min(max(w_norm / u_norm, 0.01), 10.0) if (w_norm > 0 and u_norm > 0) else 1.0
            p[i] = p[i] - step_size * coeff * u
    return p, {"exp_avg": m, "exp_avg_sq": v}


def lamb_optax_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay):
    """optax.lamb = chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate)."""
    x = [p.clone() for p in params0]
    mu = [torch.zeros_like(p) for p in params0]
    nu = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, x)
        for i in range(len(x)):
            mu[i] = beta1 * mu[i] + (1 - beta1) * g[i]  # scale_by_adam
            nu[i] = beta2 * nu[i] + (1 - beta2) * g[i] ** 2
            update = (mu[i] / (1 - beta1**t)) / (torch.sqrt(nu[i] / (1 - beta2**t)) + eps)
            update = update + weight_decay * x[i]  # add_decayed_weights
            param_norm, update_norm = x[i].norm().item(), update.norm().item()  # scale_by_trust_ratio
            trust = 1.0 if (param_norm == 0 or update_norm == 0) else param_norm / update_norm
            x[i] = x[i] + (-lr) * (trust * update)  # scale_by_learning_rate, apply_updates
    return x, {"exp_avg": mu, "exp_avg_sq": nu}


# ------------------------------------------------------------------------------------------------ LARS


def lars_paper_reference(params0, grad_fn, steps, *, lr_schedule, momentum, weight_decay, eta):
    """You, Gitman, Ginsburg 2017, Alg. 1: λ = η‖w‖/(‖∇L(w)‖ + β‖w‖); v ← m v + γ_t λ (∇L(w) + βw); w ← w − v."""
    w = [p.clone() for p in params0]
    vel = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, w)
        gamma = lr_schedule(t)
        for i in range(len(w)):
            local_lr = eta * w[i].norm().item() / (g[i].norm().item() + weight_decay * w[i].norm().item())
            vel[i] = momentum * vel[i] + gamma * local_lr * (g[i] + weight_decay * w[i])
            w[i] = w[i] - vel[i]
    return w, {"momentum_buffer": vel}


def lars_timm_reference(
    params0, grad_fn, steps, *, lr, momentum, dampening, nesterov, weight_decay, trust_coeff, eps, larc=False
):
    """timm Lars (always adapted): ratio = η‖w‖/(‖g‖ + λ‖w‖ + ε) (1 if a norm is 0), LARC min(ratio/lr, 1);
    d = (g + λw)·ratio; torch-SGD momentum (buf = d at the first step); w ← w − lr·buf (Nesterov: d + μ buf)."""
    w = [p.clone() for p in params0]
    buf = [None for _ in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, w)
        for i in range(len(w)):
            w_norm, g_norm = w[i].norm().item(), g[i].norm().item()
            ratio = (
                trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
            )
            if larc:
                ratio = min(ratio / lr, 1.0)
            d = (g[i] + weight_decay * w[i]) * ratio
            buf[i] = d.clone() if buf[i] is None else momentum * buf[i] + (1 - dampening) * d
            step = d + momentum * buf[i] if nesterov else buf[i]
            w[i] = w[i] - lr * step
    return w, {"momentum_buffer": buf}


def lars_optax_reference(params0, grad_fn, steps, *, lr, momentum, weight_decay, trust_coefficient, eps, nesterov):
    """optax.lars = chain(add_decayed_weights, scale_by_trust_ratio (η‖w‖/(‖u‖+ε)), scale_by_learning_rate, trace)."""
    w = [p.clone() for p in params0]
    trace = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, w)
        for i in range(len(w)):
            u = g[i] + weight_decay * w[i]
            param_norm, update_norm = w[i].norm().item(), u.norm().item()
            trust = (
                1.0 if (param_norm == 0 or update_norm == 0) else trust_coefficient * param_norm / (update_norm + eps)
            )
            u = -lr * (trust * u)
            trace[i] = u + momentum * trace[i]
            u = u + momentum * trace[i] if nesterov else trace[i]
            w[i] = w[i] + u
    return w, {"momentum_buffer": [-x for x in trace]}


# ------------------------------------------------------------------------------------------------ Generalized SignSGD


def gsignsgd_reference(params0, grad_fn, steps, *, lr, beta1, beta2, eps, weight_decay, bias_correction):
    """Crawshaw et al. 2022 (authors' code): g ← g + λx; m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) m²;
    x ← x − lr·m̂/(sqrt(v̂)+ε), hats only with bias correction."""
    x = [p.clone() for p in params0]
    m = [torch.zeros_like(p) for p in params0]
    v = [torch.zeros_like(p) for p in params0]
    for t in range(1, steps + 1):
        g = grad_fn(t, x)
        for i in range(len(x)):
            gi = g[i] + weight_decay * x[i]
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * m[i] * m[i]
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            x[i] = x[i] - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return x, {"exp_avg": m, "exp_avg_sq": v}
