"""The three implementations of every optimizer agree: for-loop (ground truth) vs foreach vs fused, params and state.

The fused path is checked twice: with its kernels run eagerly (every configuration, float64, tight tolerance: the
maths and the dispatch between kernels and foreach) and compiled with torch.compile (one run per kernel, float32,
50 steps, relative error < 1e-5 as issue 2 requires).
"""

import pytest
import torch
from optim_reference import make_problem, run_optimizer

from hf_clinic import GeneralizedSignSGD, Lamb, Lars, RAdam
from hf_clinic.optim import _fused


CONFIGS = [
    pytest.param(RAdam, dict(lr=1e-2, weight_decay=0.1), id="radam-skip"),
    pytest.param(
        RAdam, dict(lr=1e-2, weight_decay=0.1, warm_phase="sgd", decoupled_weight_decay=False), id="radam-sgd-l2"
    ),
    pytest.param(RAdam, dict(lr=1e-2, rectify_threshold=4.0, maximize=True), id="radam-paper-maximize"),
    pytest.param(Lamb, dict(lr=1e-2), id="lamb-paper"),
    pytest.param(Lamb, dict(lr=1e-2, preset="nvlamb", trust_clip=1.0), id="lamb-nvlamb-lambc"),
    pytest.param(
        Lamb, dict(lr=1e-2, preset="deepspeed", weight_decay=0.01, maximize=True), id="lamb-deepspeed-maximize"
    ),
    pytest.param(Lamb, dict(lr=1e-2, decoupled_weight_decay=True, bias_correction=False), id="lamb-decoupled-nobc"),
    pytest.param(Lars, dict(lr=1.0, weight_decay=1e-3), id="lars"),
    pytest.param(
        Lars,
        dict(lr=1.0, weight_decay=1e-3, nesterov=True, lr_in_momentum=False, clip_mode="larc"),
        id="larc-nesterov",
    ),
    pytest.param(
        Lars, dict(lr=1.0, weight_decay=1e-3, trust_norm="norm_of_sum", dampening=0.1, eps=1e-8), id="lars-optax"
    ),
    pytest.param(Lars, dict(lr=0.1, momentum=0.0, weight_decay=1e-3), id="lars-no-momentum"),
    pytest.param(GeneralizedSignSGD, dict(lr=1e-2, weight_decay=0.1), id="gsignsgd"),
    pytest.param(
        GeneralizedSignSGD,
        dict(lr=1e-2, betas=(0.9, 0.0), eps=0.0, bias_correction=True, decoupled_weight_decay=True, weight_decay=0.1),
        id="gsignsgd-signum-decoupled",
    ),
]
# two tensors above the fused threshold, two below (they take the foreach path inside a fused step)
SHAPES = [(64, 40), (5, 3), (48, 56), (7,)]


@pytest.fixture
def small_fused_threshold(monkeypatch):
    monkeypatch.setattr(_fused, "FUSED_MIN_NUMEL", 1024)


@pytest.fixture
def eager_kernels(monkeypatch, small_fused_threshold):
    """Fused dispatch with the kernels run as plain torch code (no compilation); RAdam uses its kernel too, not
    ATen's fused Adam (tested on its own below)."""
    monkeypatch.setattr(_fused, "_kernel", lambda name, fn: None)
    monkeypatch.setattr(_fused, "_aten_fused_adam_ok", lambda *tensors: False)


def run_groups(cls, kwargs, impl, *, steps, dtype=torch.float64):
    params0, grad_fn = make_problem(SHAPES, dtype=dtype)

    def factory(p):
        # two groups, the second without layer adaptation (as hf_clinic.param_groups builds them)
        groups = [{"params": p[:2]}, {"params": p[2:], "weight_decay": 0.0, "layer_adaptation": False}]
        return cls(groups, **kwargs, **impl)

    return run_optimizer(factory, params0, grad_fn, steps)


def assert_same(run_a, run_b, *, rtol, atol):
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            torch.testing.assert_close(value, opt_b.state[q][key], rtol=rtol, atol=atol)
    assert opt_a.telemetry().keys() == opt_b.telemetry().keys()
    for key, value in opt_a.telemetry().items():
        assert value == pytest.approx(opt_b.telemetry()[key], rel=max(rtol, 1e-12))


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_foreach_matches_forloop(cls, kwargs):
    forloop = run_groups(cls, kwargs, {"foreach": False}, steps=20)
    foreach = run_groups(cls, kwargs, {"foreach": True}, steps=20)
    assert_same(foreach, forloop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_fused_dispatch_matches_forloop(cls, kwargs, eager_kernels):
    forloop = run_groups(cls, kwargs, {"foreach": False}, steps=20)
    fused = run_groups(cls, kwargs, {"fused": True}, steps=20)
    assert_same(fused, forloop, rtol=1e-12, atol=1e-14)


COMPILED = [
    pytest.param(RAdam, dict(lr=1e-2, weight_decay=0.1), id="radam"),
    pytest.param(Lamb, dict(lr=1e-2, preset="deepspeed", weight_decay=0.01), id="lamb"),
    pytest.param(Lars, dict(lr=1.0, weight_decay=1e-3, nesterov=True), id="lars"),
    pytest.param(Lars, dict(lr=1.0, weight_decay=1e-3, trust_norm="norm_of_sum"), id="lars-norm-of-sum"),
    pytest.param(GeneralizedSignSGD, dict(lr=1e-2, weight_decay=0.1), id="gsignsgd"),
]


@pytest.mark.parametrize("cls, kwargs", COMPILED)
def test_compiled_fused_matches_forloop_float32(cls, kwargs, small_fused_threshold, recwarn, monkeypatch):
    # RAdam's float32 tensors normally take ATen's fused Adam kernel: force its compiled kernel here
    monkeypatch.setattr(_fused, "_aten_fused_adam_ok", lambda *tensors: False)
    forloop = run_groups(cls, kwargs, {"foreach": False}, steps=50, dtype=torch.float32)
    fused = run_groups(cls, kwargs, {"fused": True}, steps=50, dtype=torch.float32)
    assert not [w for w in recwarn if issubclass(w.category, _fused.FusedFallbackWarning)], "compilation fell back"
    for p, q in zip(fused[0], forloop[0], strict=True):
        assert ((p - q).norm() / q.norm()).item() < 1e-5
        for key, value in fused[1].state[p].items():
            reference = forloop[1].state[q][key]
            assert ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item() < 1e-5


@pytest.mark.parametrize("cls, kwargs", [c for c in CONFIGS if "lars-no-momentum" not in c.id][::3])
def test_fused_dispatch_with_mixed_dtypes_matches_forloop(cls, kwargs, eager_kernels):
    def run(impl):
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(64, 40)),
            torch.nn.Parameter(torch.randn(48, 56).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
        ]
        opt = cls(params, **kwargs, **impl)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape).to(p.dtype)
            opt.step()
        return params, opt

    forloop, fused = run({"foreach": False}), run({"fused": True})
    for p, q in zip(fused[0], forloop[0], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in fused[1].state[p].items():
            assert value.dtype == forloop[1].state[q][key].dtype
            torch.testing.assert_close(value, forloop[1].state[q][key], rtol=1e-5, atol=1e-6)


def test_compilation_failure_falls_back_to_foreach_with_one_warning(monkeypatch, small_fused_threshold):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(_fused, "_KERNELS", {})
    monkeypatch.setattr(_fused, "_DISABLED", {})
    forloop = run_groups(Lamb, dict(lr=1e-2), {"foreach": False}, steps=10)
    with pytest.warns(_fused.FusedFallbackWarning, match="no C\\+\\+ compiler") as record:
        fused = run_groups(Lamb, dict(lr=1e-2), {"fused": True}, steps=10)
    assert len([w for w in record if issubclass(w.category, _fused.FusedFallbackWarning)]) == 1
    assert_same(fused, forloop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=False, maximize=True, warm_phase="sgd")],
    ids=["decoupled", "l2-maximize-sgd"],
)
def test_radam_aten_fused_adam_route_matches_forloop(kwargs, dtype):
    """Rectified RAdam steps through torch._fused_adam(w)_ with neutralised bias corrections: 50 steps."""
    params0, grad_fn = make_problem(SHAPES, dtype=dtype)
    forloop = run_optimizer(lambda p: RAdam(p, lr=1e-2, foreach=False, **kwargs), params0, grad_fn, 50)
    fused = run_optimizer(lambda p: RAdam(p, lr=1e-2, fused=True, **kwargs), params0, grad_fn, 50)
    if dtype == torch.float64:
        assert_same(fused, forloop, rtol=1e-12, atol=1e-14)
    else:
        for p, q in zip(fused[0], forloop[0], strict=True):
            assert ((p - q).norm() / q.norm()).item() < 1e-5
    grads = [p.grad.clone() for p in fused[0]]
    fused[1].step()
    assert all(torch.equal(p.grad, g) for p, g in zip(fused[0], grads, strict=True))  # grads never written


def test_radam_fused_none_uses_the_compile_free_route():
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    opt = RAdam(params)
    assert opt._implementation(opt.param_groups[0], params) == (
        "fused" if _fused._compile_supported() is None else "foreach"
    )
    bf16 = [torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))]
    opt = RAdam(bf16)
    assert opt._implementation(opt.param_groups[0], bf16) == "foreach"  # would need a compile: not worth it


def test_fused_none_does_not_compile_small_models(monkeypatch):
    compiled = []
    monkeypatch.setattr(_fused, "_kernel", lambda name, fn: compiled.append(name))
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(3)]
    opt = Lamb(params)
    for _ in range(8):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert compiled == []
    assert not _fused.fused_by_default(params)
    assert not _fused.fused_by_default([torch.empty(4096, 4096)])  # 16.8M elements: not worth a compile
    big = [torch.empty(4096, 4096) for _ in range(3)] + [torch.empty(30522, 768)]  # 73.8M elements: worth it
    assert _fused.fused_by_default(big) == (_fused._compile_supported() is None)


def test_fused_and_foreach_cannot_both_be_true():
    with pytest.raises(ValueError, match="`fused` and `foreach` cannot be `True` together"):
        RAdam([torch.nn.Parameter(torch.zeros(2))], foreach=True, fused=True)
