"""hf_clinic optimizers against independent float64 references (paper pseudo-code, reference rules, torch) and
against the invariants the papers state."""

import math

import pytest
import torch
from optim_reference import (
    gsignsgd_reference,
    lamb_deepspeed_reference,
    lamb_global_clip_reference,
    lamb_optax_reference,
    lamb_paper_reference,
    lars_optax_reference,
    lars_paper_reference,
    lars_timm_reference,
    make_problem,
    radam_reference,
    run_optimizer,
)

from hf_clinic import GeneralizedSignSGD, Lamb, Lars, RAdam


SHAPES = [(6, 5), (7,), (3, 2, 2), (1,)]
STEPS = 25
IMPLEMENTATIONS = [pytest.param({"foreach": False}, id="forloop"), pytest.param({"foreach": True}, id="foreach")]


def assert_trajectory(params, reference, *, rtol=1e-10, atol=1e-12):
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=rtol, atol=atol)


def assert_state(optimizer, params, reference_state, *, rtol=1e-10, atol=1e-12):
    for key, values in reference_state.items():
        for p, r in zip(params, values, strict=True):
            torch.testing.assert_close(optimizer.state[p][key], r, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------ RAdam

RADAM_CASES = [
    dict(weight_decay=0.0, decoupled_weight_decay=True, rectify_threshold=5.0, warm_phase="skip"),
    dict(weight_decay=0.1, decoupled_weight_decay=True, rectify_threshold=5.0, warm_phase="skip"),
    dict(weight_decay=0.1, decoupled_weight_decay=False, rectify_threshold=5.0, warm_phase="skip"),
    dict(weight_decay=0.1, decoupled_weight_decay=True, rectify_threshold=4.0, warm_phase="sgd"),
    dict(weight_decay=0.1, decoupled_weight_decay=False, rectify_threshold=5.0, warm_phase="sgd"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", RADAM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_radam_matches_paper(case, impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(
        lambda p: RAdam(p, lr=1e-2, betas=(0.9, 0.99), **case, **impl), params0, grad_fn, STEPS
    )
    ref, ref_state = radam_reference(
        params0,
        grad_fn,
        STEPS,
        lr=1e-2,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=case["weight_decay"],
        decoupled=case["decoupled_weight_decay"],
        threshold=case["rectify_threshold"],
        warm_phase=case["warm_phase"],
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_radam_sgd_warm_phase_equals_torch_radam(weight_decay, impl):
    params0, grad_fn = make_problem(SHAPES)
    ours, ours_opt = run_optimizer(
        lambda p: RAdam(p, lr=1e-2, weight_decay=weight_decay, warm_phase="sgd", rectify_threshold=5.0, **impl),
        params0,
        grad_fn,
        30,
    )
    theirs, theirs_opt = run_optimizer(
        lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=weight_decay, decoupled_weight_decay=True, foreach=False),
        params0,
        grad_fn,
        30,
    )
    assert_trajectory(ours, [p.detach() for p in theirs], rtol=1e-12, atol=1e-14)
    for p, q in zip(ours, theirs, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours_opt.state[p][key], theirs_opt.state[q][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("threshold, first_rectified", [(5.0, 6), (4.0, 5)])
def test_radam_skip_mode_leaves_params_until_first_rectified_step(threshold, first_rectified):
    params0, grad_fn = make_problem(SHAPES)
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = RAdam(params, lr=1e-2, weight_decay=0.1, rectify_threshold=threshold, warm_phase="skip")
    for t in range(1, first_rectified + 1):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grad_fn(t, [p.detach() for p in params]), strict=True):
            p.grad = g
        opt.step()
        changed = any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
        assert changed == (t == first_rectified), f"t={t}"
        assert opt.telemetry()["radam/rectified"] == float(t == first_rectified)
        # the moments move from the first step on (official code: m and v are updated while skipping)
        assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in params)


def test_radam_telemetry_matches_hand_computed_rho():
    beta2 = 0.999
    rho_inf = 2 / (1 - beta2) - 1
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = RAdam([p], betas=(0.9, beta2))
    assert opt.telemetry() == {}
    for t in range(1, 8):
        p.grad = torch.ones_like(p)
        opt.step()
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        telemetry = opt.telemetry()
        assert telemetry["radam/rho_t"] == pytest.approx(rho_t, rel=1e-12)
        if t >= 6:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            assert telemetry["radam/rectification"] == pytest.approx(r_t, rel=1e-12)
        else:
            assert telemetry["radam/rectification"] == 0.0


# ------------------------------------------------------------------------------------------------ LAMB


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_paper_preset_matches_paper(bias_correction, impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(
        lambda p: Lamb(p, lr=1e-2, weight_decay=0.01, bias_correction=bias_correction, preset="paper", **impl),
        params0,
        grad_fn,
        STEPS,
    )
    ref, ref_state = lamb_paper_reference(
        params0,
        grad_fn,
        STEPS,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-6,
        weight_decay=[0.01] * len(SHAPES),
        adapt=[True] * len(SHAPES),
        bias_correction=bias_correction,
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lamb_excluded_group_gets_no_ratio_nor_decay(impl):
    """MLPerf exclusion: param_groups' no-decay group (layer_adaptation=False) is plain Adam, even with adapt='all'."""
    params0, grad_fn = make_problem(SHAPES)

    def factory(p):
        groups = [
            {"params": p[:2], "weight_decay": 0.01},
            {"params": p[2:], "weight_decay": 0.0, "layer_adaptation": False},
        ]
        return Lamb(groups, lr=1e-2, adapt="all", **impl)

    params, _ = run_optimizer(factory, params0, grad_fn, STEPS)
    ref, _ = lamb_paper_reference(
        params0,
        grad_fn,
        STEPS,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-6,
        weight_decay=[0.01, 0.01, 0.0, 0.0],
        adapt=[True, True, False, False],
    )
    assert_trajectory(params, ref)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("preset, adapt_zero_wd", [("nvlamb", True), ("timm", False)])
def test_lamb_global_clip_presets_match_reference(preset, adapt_zero_wd, impl):
    params0, grad_fn = make_problem(SHAPES)

    def factory(p):
        groups = [{"params": p[:2], "weight_decay": 0.01}, {"params": p[2:], "weight_decay": 0.0}]
        return Lamb(groups, lr=1e-2, preset=preset, **impl)

    params, opt = run_optimizer(factory, params0, grad_fn, STEPS)
    assert opt.defaults["max_grad_norm"] == 1.0  # the gradients (norm ~5) are clipped on every step
    ref, ref_state = lamb_global_clip_reference(
        params0,
        grad_fn,
        STEPS,
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-6,
        weight_decay=[0.01, 0.01, 0.0, 0.0],
        max_grad_norm=1.0,
        adapt=[True, True, adapt_zero_wd, adapt_zero_wd],
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lamb_deepspeed_preset_matches_reference(impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(
        lambda p: Lamb(p, lr=1e-2, weight_decay=0.01, preset="deepspeed", **impl), params0, grad_fn, STEPS
    )
    ref, ref_state = lamb_deepspeed_reference(
        params0, grad_fn, STEPS, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


def test_lamb_deepspeed_ratio_clamp_is_active():
    """A zero-mean tiny update vs a large weight: ‖p‖/‖u‖ > 10 is clamped to 10 (DeepSpeed max_coeff)."""
    p = torch.nn.Parameter(torch.full((4,), 100.0, dtype=torch.float64))
    opt = Lamb([p], lr=1e-3, preset="deepspeed")
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    opt.step()
    assert opt.telemetry()["lamb/trust_ratio_max"] == 10.0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lamb_optax_preset_matches_reference(impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(
        lambda p: Lamb(p, lr=1e-2, weight_decay=0.01, preset="optax", **impl), params0, grad_fn, STEPS
    )
    ref, ref_state = lamb_optax_reference(
        params0, grad_fn, STEPS, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lamb_first_step_relative_change_is_lr_without_weight_decay(impl):
    params0, grad_fn = make_problem(SHAPES)
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = Lamb(params, lr=0.03, weight_decay=0.0, adapt="all", **impl)
    for p, g in zip(params, grad_fn(1, params0), strict=True):
        p.grad = g
    opt.step()
    for p, p0 in zip(params, params0, strict=True):
        assert ((p.detach() - p0).norm() / p0.norm()).item() == pytest.approx(0.03, rel=1e-12)


def test_lamb_trust_clip_bounds_the_ratio_lambc():
    """First step by hand: u = g/(|g|+ε) + λx, ratio = min(‖x‖/‖u‖, 1) (LAMBC, Fong et al. 2020)."""
    torch.manual_seed(0)
    x0 = [torch.randn(5, 4, dtype=torch.float64) * 10, torch.randn(6, dtype=torch.float64) * 0.01]
    grads = [torch.randn(5, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = Lamb(params, lr=1e-2, weight_decay=0.01, trust_clip=1.0)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    ratios = []
    for p, x, g in zip(params, x0, grads, strict=True):
        u = g / (g.abs() + 1e-6) + 0.01 * x
        ratio = min(x.norm().item() / u.norm().item(), 1.0)
        ratios.append(ratio)
        torch.testing.assert_close(p.detach(), x - 1e-2 * ratio * u, rtol=1e-12, atol=1e-14)
    assert ratios[0] == 1.0 and ratios[1] < 1.0  # one clipped, one not
    assert opt.telemetry()["lamb/trust_ratio_max"] == 1.0


# ------------------------------------------------------------------------------------------------ LARS


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lars_matches_paper_under_poly2_schedule(impl):
    params0, grad_fn = make_problem(SHAPES)
    total = 30

    def schedule(t):
        return 2.0 * (1 - (t - 1) / total) ** 2

    params, opt = run_optimizer(
        lambda p: Lars(p, lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=1e-3, **impl),
        params0,
        grad_fn,
        total,
        lr_schedule=schedule,
    )
    ref, ref_state = lars_paper_reference(
        params0, grad_fn, total, lr_schedule=schedule, momentum=0.9, weight_decay=1e-3, eta=1e-3
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "case",
    [
        dict(nesterov=False, dampening=0.0, eps=1e-8, larc=False),
        dict(nesterov=True, dampening=0.0, eps=0.0, larc=False),
        dict(nesterov=False, dampening=0.1, eps=0.0, larc=True),
    ],
    ids=["plain", "nesterov", "larc-dampening"],
)
def test_lars_lr_outside_momentum_matches_timm_rule(case, impl):
    params0, grad_fn = make_problem(SHAPES)
    lr = 0.5
    params, opt = run_optimizer(
        lambda p: Lars(
            p,
            lr=lr,
            momentum=0.9,
            dampening=case["dampening"],
            nesterov=case["nesterov"],
            weight_decay=1e-3,
            eps=case["eps"],
            lr_in_momentum=False,
            clip_mode="larc" if case["larc"] else None,
            adapt="all",
            **impl,
        ),
        params0,
        grad_fn,
        STEPS,
    )
    ref, ref_state = lars_timm_reference(
        params0,
        grad_fn,
        STEPS,
        lr=lr,
        momentum=0.9,
        dampening=case["dampening"],
        nesterov=case["nesterov"],
        weight_decay=1e-3,
        trust_coeff=1e-3,
        eps=case["eps"],
        larc=case["larc"],
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_norm_of_sum_matches_optax(nesterov, impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(
        lambda p: Lars(
            p, lr=0.5, weight_decay=1e-3, trust_norm="norm_of_sum", eps=1e-9, nesterov=nesterov, adapt="all", **impl
        ),
        params0,
        grad_fn,
        STEPS,
    )
    ref, ref_state = lars_optax_reference(
        params0,
        grad_fn,
        STEPS,
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-3,
        trust_coefficient=1e-3,
        eps=1e-9,
        nesterov=nesterov,
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_lars_local_lr_is_eta_w_over_g_plus_lambda_w(impl):
    torch.manual_seed(0)
    w0 = torch.randn(8, 4, dtype=torch.float64)
    g = torch.randn(8, 4, dtype=torch.float64) * 3
    eta, lam, lr = 2e-3, 0.05, 0.7
    w = torch.nn.Parameter(w0.clone())
    opt = Lars([w], lr=lr, momentum=0.0, weight_decay=lam, trust_coefficient=eta, **impl)
    w.grad = g.clone()
    opt.step()
    expected = eta * w0.norm().item() / (g.norm().item() + lam * w0.norm().item())
    applied = ((w0 - w.detach()).norm() / (lr * (g + lam * w0).norm())).item()
    assert applied == pytest.approx(expected, rel=1e-12)
    assert opt.telemetry()["lars/trust_ratio_median"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LarsDegeneratesToSGDWarning")
def test_lars_without_weight_decay_is_momentum_sgd_in_decayed_mode():
    params0, grad_fn = make_problem(SHAPES)
    ours, _ = run_optimizer(lambda p: Lars(p, lr=0.1, momentum=0.9, lr_in_momentum=False), params0, grad_fn, 10)
    sgd, _ = run_optimizer(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), params0, grad_fn, 10)
    assert_trajectory(ours, [p.detach() for p in sgd], rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------------------------------------ Generalized SignSGD


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "case",
    [
        dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=False),
        dict(betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, bias_correction=False),
        dict(betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01, bias_correction=True),
    ],
    ids=["default", "transformer-recipe", "bias-corrected"],
)
def test_gsignsgd_matches_authors_rule(case, impl):
    params0, grad_fn = make_problem(SHAPES)
    params, opt = run_optimizer(lambda p: GeneralizedSignSGD(p, lr=1e-2, **case, **impl), params0, grad_fn, STEPS)
    ref, ref_state = gsignsgd_reference(
        params0,
        grad_fn,
        STEPS,
        lr=1e-2,
        beta1=case["betas"][0],
        beta2=case["betas"][1],
        eps=case["eps"],
        weight_decay=case["weight_decay"],
        bias_correction=case["bias_correction"],
    )
    assert_trajectory(params, ref)
    assert_state(opt, params, ref_state)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gsignsgd_beta2_zero_eps_zero_is_signum(impl):
    params0, grad_fn = make_problem(SHAPES)
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = GeneralizedSignSGD(params, lr=0.01, betas=(0.9, 0.0), eps=0.0, **impl)
    expected = [p.clone() for p in params0]
    momentum = [torch.zeros_like(p) for p in params0]
    for t in range(1, 11):
        grads = grad_fn(t, [p.detach() for p in params])
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            momentum[i] = 0.9 * momentum[i] + 0.1 * g
            expected[i] = expected[i] - 0.01 * torch.sign(momentum[i])
    assert_trajectory(params, expected, rtol=0, atol=1e-15)
