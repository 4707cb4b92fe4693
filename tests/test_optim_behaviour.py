"""Generic optimizer behaviour, torch OptimizerInfo style: errors as data, edge cases, state, dtypes, telemetry."""

import copy
import io
import warnings

import pytest
import torch
from optim_reference import make_problem, run_optimizer

from hf_clinic import GeneralizedSignSGD, Lamb, Lars, RAdam
from hf_clinic.optim import LambDegeneratesToAdamWarning, LarsDegeneratesToSGDWarning


# One entry per optimizer configuration the generic tests run (the `desc` is the test id).
OPTIMIZER_INPUTS = [
    pytest.param(RAdam, dict(lr=1e-2, weight_decay=0.1), id="radam"),
    pytest.param(
        RAdam, dict(lr=1e-2, warm_phase="sgd", decoupled_weight_decay=False, weight_decay=0.1), id="radam-sgd"
    ),
    pytest.param(Lamb, dict(lr=1e-2), id="lamb"),
    pytest.param(Lamb, dict(lr=1e-2, preset="nvlamb"), id="lamb-nvlamb"),
    pytest.param(Lamb, dict(lr=1e-2, preset="deepspeed"), id="lamb-deepspeed"),
    pytest.param(Lars, dict(lr=0.5, weight_decay=1e-3), id="lars"),
    pytest.param(Lars, dict(lr=0.5, weight_decay=1e-3, nesterov=True, clip_mode="larc"), id="larc-nesterov"),
    pytest.param(GeneralizedSignSGD, dict(lr=1e-2, weight_decay=0.1), id="gsignsgd"),
]
IMPLS = [pytest.param({"foreach": False}, id="forloop"), pytest.param({"foreach": True}, id="foreach")]


def _param():
    return [torch.nn.Parameter(torch.ones(3))]


# ------------------------------------------------------------------------------------------------ errors as data

# (class, constructor kwargs, error type, regex the message must match)
ERROR_INPUTS = [
    (RAdam, dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    (RAdam, dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    (RAdam, dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    (RAdam, dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
    (RAdam, dict(betas=(0.9,)), ValueError, "Invalid betas: \\(0.9,\\)"),
    (RAdam, dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    (RAdam, dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (RAdam, dict(rectify_threshold=3.0), ValueError, "Invalid rectify_threshold value: 3.0"),
    (RAdam, dict(warm_phase="adam"), ValueError, "Invalid warm_phase: 'adam'; valid values: 'skip', 'sgd'"),
    (RAdam, dict(decoupled_weight_decay="yes"), ValueError, "Invalid decoupled_weight_decay: 'yes'"),
    (RAdam, dict(foreach="auto"), ValueError, "Invalid foreach: 'auto'"),
    (Lamb, dict(preset="apex"), ValueError, "Invalid preset: 'apex'; valid values: None, 'paper', 'nvlamb', 'timm'"),
    (Lamb, dict(adapt="layers"), ValueError, "Invalid adapt: 'layers'; valid values: 'decayed', 'all', 'none'"),
    (Lamb, dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
    (Lamb, dict(trust_clip=-1.0), ValueError, "Invalid trust_clip value: -1.0"),
    (Lamb, dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    (Lamb, dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1: 1.5"),
    (Lars, dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (Lars, dict(lr=1.0, momentum=1.0), ValueError, "Invalid momentum value: 1.0"),
    (Lars, dict(lr=1.0, dampening=2.0), ValueError, "Invalid dampening value: 2.0"),
    (Lars, dict(lr=1.0, trust_coefficient=0.0), ValueError, "Invalid trust_coefficient value: 0.0"),
    (Lars, dict(lr=1.0, nesterov=True, dampening=0.1), ValueError, "Nesterov momentum requires"),
    (
        Lars,
        dict(lr=1.0, trust_norm="l2"),
        ValueError,
        "Invalid trust_norm: 'l2'; valid values: 'sum_of_norms', 'norm_of_sum'",
    ),
    (Lars, dict(lr=1.0, clip_mode="clip"), ValueError, "Invalid clip_mode: 'clip'; valid values: None, 'larc'"),
    (Lars, dict(lr=1.0, adapt="every"), ValueError, "Invalid adapt: 'every'"),
    (GeneralizedSignSGD, dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    (GeneralizedSignSGD, dict(bias_correction=1), ValueError, "Invalid bias_correction: 1"),
    (GeneralizedSignSGD, dict(lr=torch.tensor(0.1)), ValueError, "Invalid learning rate"),
]


@pytest.mark.parametrize(
    "cls, kwargs, error, match", ERROR_INPUTS, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _, _ in ERROR_INPUTS]
)
def test_invalid_hyperparameters_raise_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(_param(), **kwargs)


@pytest.mark.parametrize("cls", [RAdam, Lamb, GeneralizedSignSGD])
def test_invalid_group_override_raises(cls):
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        cls([{"params": _param()}, {"params": _param(), "lr": -1}])


def test_invalid_layer_adaptation_value_raises():
    with pytest.raises(ValueError, match="Invalid layer_adaptation: 'no'"):
        Lamb([{"params": _param(), "layer_adaptation": "no"}])


@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_sparse_gradients_raise(cls, kwargs):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(embedding.parameters(), **kwargs)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_complex_params_are_refused():
    with pytest.raises(ValueError, match="does not support complex parameters"):
        RAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


# ------------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_params_without_grad_are_skipped_and_get_no_state(cls, kwargs, impl):
    with_grad, without_grad = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    before = without_grad.detach().clone()
    opt = cls([with_grad, without_grad], **kwargs, **impl)
    for _ in range(7):
        with_grad.grad = torch.randn(4, 3)
        opt.step()
    assert torch.equal(without_grad, before)
    assert without_grad not in opt.state
    assert opt.state[with_grad]["step"].item() == 7.0


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LambDegeneratesToAdamWarning")
@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LarsDegeneratesToSGDWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_zero_grads_leave_params_unchanged_without_weight_decay(cls, kwargs, impl):
    kwargs = dict(kwargs, weight_decay=0.0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    before = [p.detach().clone() for p in params]
    opt = cls(params, **kwargs, **impl)
    for _ in range(8):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_zero_initialised_params_stay_finite_and_move(cls, kwargs, impl):
    """‖w‖ = 0: the trust ratio is 1 (zero-norm guard), no NaN; zero params with zero grads stay zero."""
    moving, idle = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))
    opt = cls([moving, idle], **kwargs, **impl)
    for _ in range(8):
        moving.grad = torch.randn(4, 3)
        idle.grad = torch.zeros(5)
        opt.step()
    assert torch.isfinite(moving).all() and moving.abs().sum() > 0
    assert torch.equal(idle, torch.zeros(5))
    for value in opt.telemetry().values():
        assert value == value  # not NaN


def test_lamb_zero_norm_guard_gives_ratio_one():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, weight_decay=0.01)
    p.grad = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    opt.step()
    assert opt.telemetry()["lamb/trust_ratio_min"] == 1.0
    # ratio 1: the Adam step itself, -lr·g/(|g|+ε)
    torch.testing.assert_close(p.detach(), -0.1 * p.grad / (p.grad.abs() + 1e-6), rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_nan_gradients_propagate_as_in_torch(cls, kwargs, impl):
    """No silent repair: a NaN gradient makes the parameter NaN (torch.optim.Adam does the same)."""
    p = torch.nn.Parameter(torch.ones(6, 3))
    opt = cls([p], **dict(kwargs, lr=1e-2), **impl)
    for _ in range(6):  # past RAdam's warm phase
        p.grad = torch.ones(6, 3)
        opt.step()
    p.grad = torch.full((6, 3), float("nan"))
    opt.step()
    assert torch.isnan(p).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_maximize_equals_minimizing_the_negated_gradient(cls, kwargs, impl):
    params0, grad_fn = make_problem([(5, 4), (3,)])

    def negated(t, thetas):
        return [-g for g in grad_fn(t, thetas)]

    maximized, _ = run_optimizer(lambda p: cls(p, **kwargs, maximize=True, **impl), params0, negated, 10)
    minimized, _ = run_optimizer(lambda p: cls(p, **kwargs, **impl), params0, grad_fn, 10)
    for a, b in zip(maximized, minimized, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_step_with_closure_returns_the_loss(cls, kwargs):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = cls([w], **kwargs)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert w.grad is not None


def test_lamb_never_writes_into_grad():
    params0, grad_fn = make_problem([(5, 4), (3,)])
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    grads = grad_fn(1, params0)
    for foreach in (False, True):
        opt = Lamb(params, lr=1e-2, max_grad_norm=0.1, foreach=foreach)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)


# ------------------------------------------------------------------------------------------------ dtypes and state


@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_mixed_dtypes_foreach_matches_forloop_with_fp32_state_for_bf16(cls, kwargs):
    def run(foreach):
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(4, 3)),
            torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(6).to(torch.float16)),
        ]
        opt = cls(params, **kwargs, foreach=foreach)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape).to(p.dtype)
            opt.step()
        return params, opt

    (fl, fl_opt), (fe, fe_opt) = run(False), run(True)
    for p, q in zip(fl, fe, strict=True):
        assert q.dtype == p.dtype
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        expected_state_dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        for key, value in fe_opt.state[q].items():
            if key == "step":
                assert value.dtype == torch.float32 and value.device.type == "cpu" and value.dim() == 0
            else:
                assert value.dtype == expected_state_dtype, key
                torch.testing.assert_close(value, fl_opt.state[p][key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_bf16_params_keep_fp32_state_through_load_state_dict(cls, kwargs):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))
    opt = cls([param], **kwargs)
    for _ in range(7):
        param.grad = (torch.randn(8, 4) * 1e-3).to(torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded_dict = torch.load(buffer, weights_only=True)

    clone = torch.nn.Parameter(param.detach().clone())
    fresh = cls([clone], **kwargs)
    fresh.load_state_dict(loaded_dict)
    for key, value in opt.state[param].items():
        restored = fresh.state[clone][key]
        assert restored.dtype == value.dtype, key
        assert torch.equal(restored, value), key
        assert restored.data_ptr() != loaded_dict["state"][0][key].data_ptr()  # no aliasing of the loaded dict
    assert fresh.state[clone]["exp_avg" if "exp_avg" in opt.state[param] else "momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_state_dict_round_trip_continues_in_lock_step(cls, kwargs, impl):
    """timm's _test_state_dict pattern: prime, load into a fresh optimizer on cloned params, step both in lock-step."""
    params0, grad_fn = make_problem([(5, 4), (3,)], dtype=torch.float32)
    params, opt = run_optimizer(lambda p: cls(p, **kwargs, **impl), params0, grad_fn, 7)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = cls(clones, **kwargs, **impl)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for t in range(8, 16):
        grads = grad_fn(t, [p.detach() for p in params])
        for a, b, g in zip(params, clones, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        fresh.step()
        for a, b in zip(params, clones, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(params, clones, strict=True):
        for key, value in opt.state[a].items():
            assert torch.equal(value, fresh.state[b][key])
    assert opt.telemetry() == fresh.telemetry()


@pytest.mark.parametrize("cls, kwargs", OPTIMIZER_INPUTS)
def test_optimizer_can_be_printed_and_deep_copied(cls, kwargs):
    opt = cls(_param(), **kwargs)
    assert cls.__name__ in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.defaults == opt.defaults
    assert clone.telemetry() == {}


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LarsDegeneratesToSGDWarning")
def test_state_holds_exactly_the_theoretical_buffers():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    for cls, kwargs, buffers in [
        (RAdam, {}, {"exp_avg", "exp_avg_sq"}),
        (Lamb, {}, {"exp_avg", "exp_avg_sq"}),
        (GeneralizedSignSGD, {}, {"exp_avg", "exp_avg_sq"}),
        (Lars, {"lr": 1.0}, {"momentum_buffer"}),
        (Lars, {"lr": 1.0, "momentum": 0.0}, set()),
    ]:
        opt = cls(params, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in params:
            assert set(opt.state[p]) == buffers | {"step"}
            for key in buffers:
                assert opt.state[p][key].shape == p.shape


# ------------------------------------------------------------------------------------------------ presets, warnings, telemetry


def test_lamb_explicit_kwargs_override_preset_even_at_default_values():
    p = _param()
    assert Lamb(p, preset="nvlamb").defaults["max_grad_norm"] == 1.0
    assert Lamb(p, preset="nvlamb").defaults["adapt"] == "all"
    assert Lamb(p, preset="nvlamb", max_grad_norm=None).defaults["max_grad_norm"] is None
    assert Lamb(p, preset="nvlamb", adapt="decayed").defaults["adapt"] == "decayed"
    assert Lamb(p, preset="deepspeed").defaults["eps"] == 1e-8
    assert Lamb(p, preset="deepspeed", eps=1e-6).defaults["eps"] == 1e-6
    assert (
        Lamb(p, 1e-3, (0.9, 0.999), 1e-6, 0.01, True, "decayed", 2.0, preset="timm").defaults["max_grad_norm"] == 2.0
    )


def test_lamb_warns_once_when_it_degenerates_to_adam():
    with pytest.warns(LambDegeneratesToAdamWarning, match="LAMB degenerates to Adam"):
        Lamb(_param(), weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambDegeneratesToAdamWarning)
        Lamb(_param())  # weight decay 0.01
        Lamb(_param(), weight_decay=0.0, adapt="all")
        Lamb([{"params": _param(), "weight_decay": 0.01}, {"params": _param(), "weight_decay": 0.0}], weight_decay=0.0)


def test_lars_warns_when_it_degenerates_to_sgd():
    with pytest.warns(LarsDegeneratesToSGDWarning, match="LARS degenerates to momentum SGD"):
        Lars(_param(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LarsDegeneratesToSGDWarning)
        Lars(_param(), lr=1.0, weight_decay=1e-4)
        Lars(_param(), lr=1.0, adapt="all")


@pytest.mark.parametrize(
    "cls, kwargs, prefix", [(Lamb, {}, "lamb"), (Lars, {"lr": 1.0, "weight_decay": 1e-3}, "lars")]
)
def test_trust_ratio_telemetry_is_lazy_and_switchable(cls, kwargs, prefix):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3) * 5)]
    opt = cls(params, **kwargs)
    off = cls(params, **kwargs, telemetry=False)
    assert opt.telemetry() == {}
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    off.step()
    stats = opt.telemetry()
    assert set(stats) == {f"{prefix}/trust_ratio_min", f"{prefix}/trust_ratio_median", f"{prefix}/trust_ratio_max"}
    assert (
        stats[f"{prefix}/trust_ratio_min"]
        <= stats[f"{prefix}/trust_ratio_median"]
        <= stats[f"{prefix}/trust_ratio_max"]
    )
    assert all(isinstance(v, float) for v in stats.values())
    assert off.telemetry() == {}
