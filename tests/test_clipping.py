"""Clip policies and ClipAwareSchedule, outside the Trainer.

Thresholds are checked against hand-computed sequences (the arithmetic is written out next to each value) and
`numpy.percentile`; clipping against `torch.nn.utils.clip_grad_norm_`; AGC against values worked out by hand.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from hf_clinic import ClipAwareSchedule, get_clip_policy, list_clip_policies
from hf_clinic.clipping import (
    FixedClip,
    PercentileClip,
    StepLengthClip,
    UnitwiseClip,
    ZScoreClip,
    register_clip_policy,
)
from hf_clinic.clipping.policies import ClipPolicy


def thresholds(policy, norms, lrs=None, base_lr=None):
    lrs = lrs or [0.1] * len(norms)
    return [policy.threshold(g, lr=lr, base_lr=base_lr or lr) for g, lr in zip(norms, lrs, strict=True)]


# ---- policies against hand-computed sequences ------------------------------------------------------------------


def test_fixed():
    assert thresholds(FixedClip(max_norm=0.5), [0.1, 3.0, 1e9]) == [0.5, 0.5, 0.5]
    inherited = FixedClip()
    inherited.inherit(2.0)
    assert thresholds(inherited, [1.0]) == [2.0]
    inherited = FixedClip()
    inherited.inherit(0.0)  # Trainer max_grad_norm=0: observe only
    assert thresholds(inherited, [1.0]) == [math.inf]
    with pytest.raises(ValueError, match="pass max_norm"):
        FixedClip().threshold(1.0, lr=0.1, base_lr=0.1)


def test_step_length():
    # c_t = gamma / eta_t: 0.5/0.1 = 5, 0.5/0.05 = 10, eta = 0 -> no clipping.
    assert thresholds(StepLengthClip(gamma=0.5), [1, 1, 1], lrs=[0.1, 0.05, 0.0]) == [5.0, 10.0, math.inf]
    # follow_lr: gamma_t = gamma * eta_t / eta_peak, so c_t = gamma / eta_peak = 0.5 / 0.1 = 5 throughout.
    policy = StepLengthClip(gamma=0.5, gamma_schedule="follow_lr")
    assert thresholds(policy, [1, 1, 1], lrs=[0.1, 0.05, 0.0], base_lr=0.1) == [5.0, 5.0, 5.0]


def test_percentile_bounded_history():
    # p=50, history 3; history includes the current norm:
    # [4] -> 4; [1,4] -> 1 + 0.5*3 = 2.5; [1,3,4] -> 3; [1,2,3] (4 evicted) -> 2; [2,3,10] (1 evicted) -> 3.
    assert thresholds(PercentileClip(50.0, history_size=3), [4, 1, 3, 2, 10]) == [4, 2.5, 3, 2, 3]
    # p=10 over 1..5: rank 0.4 -> 1 + 0.4 * (2 - 1) = 1.4.
    assert thresholds(PercentileClip(10.0, history_size=None), [5, 3, 1, 4, 2])[-1] == pytest.approx(1.4)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(size=40).tolist()
    policy = PercentileClip(percentile=10.0, history_size=16)
    for t, c in enumerate(thresholds(policy, norms)):
        window = norms[max(0, t - 15) : t + 1]
        assert c == pytest.approx(float(np.percentile(window, 10.0)), rel=1e-12)


def test_zscore_sequence():
    policy = ZScoreClip(alpha=0.5, z_thresh=1.0, max_grad_norm=10.0, eps=0.0, warmup_steps=2)
    got = thresholds(policy, [1.0, 3.0, 2.5, 6.0, 30.0])
    # warm-up: [1, 3] -> mean 2, var ((1-2)^2 + (3-2)^2)/2 = 1; thresholds are the cap (10) meanwhile.
    # t=3: z = (2.5-2)/1 = 0.5 <= 1, no spike -> cap; mean = .5*2 + .5*2.5 = 2.25, var = .5*1 + .5*(2.5-2.25)^2
    var3 = 0.5 * 1 + 0.5 * 0.25**2
    # t=4: z = 3.75/sqrt(var3) > 1 -> spike; c = mean + z_thr*std/(z/z_thr) = 2.25 + var3/(6 - 2.25)
    c4 = 2.25 + var3 / 3.75
    mean4 = 0.5 * 2.25 + 0.5 * c4  # EMAs fed with c on spikes; variance uses the updated mean
    var4 = 0.5 * var3 + 0.5 * (c4 - mean4) ** 2
    # t=5: spike again; c = mean4 + var4 / (30 - mean4), below the cap of 10
    c5 = mean4 + var4 / (30.0 - mean4)
    assert got[:3] == [10.0, 10.0, 10.0]
    assert got[3] == pytest.approx(c4, rel=1e-12) and got[4] == pytest.approx(c5, rel=1e-12)
    assert policy.mean == pytest.approx(0.5 * mean4 + 0.5 * c5, rel=1e-12)


def test_zscore_mean_option_cap_and_frozen_stats():
    policy = ZScoreClip(alpha=0.5, z_thresh=1.0, max_grad_norm=None, eps=0.0, warmup_steps=2, clip_option="mean")
    policy.skip_update_on_spike = True
    got = thresholds(policy, [1.0, 3.0, 100.0, 2.0])
    # no cap: inf during warm-up and without spike; spike at 100 -> c = mean = 2, statistics frozen.
    assert got[:3] == [math.inf, math.inf, 2.0] and (policy.mean, policy.var) == (0.5 * 2 + 0.5 * 2.0, 0.5 * 1.0)
    capped = ZScoreClip(alpha=0.5, z_thresh=1.0, max_grad_norm=0.5, eps=0.0, warmup_steps=2, clip_factor=0.5)
    assert thresholds(capped, [1.0, 3.0, 100.0]) == [0.5, 0.5, 0.5]  # min(adaptive * 0.5, 0.5)


def test_unitwise_hand_computed():
    model = torch.nn.Module()
    model.body = torch.nn.Linear(2, 2)
    model.classifier = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.body.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        model.body.bias.copy_(torch.tensor([1.0, 0.0]))
        model.classifier.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model.body.weight.grad = torch.tensor([[0.3, 0.4], [1.0, 0.0]])
    bias_grad = model.body.bias.grad = torch.tensor([0.0, 0.001])
    model.classifier.weight.grad = torch.tensor([[5.0, 0.0]])
    bias_before = bias_grad.clone()
    policy = UnitwiseClip(clip_factor=0.01, eps=1e-3)
    pre = math.sqrt(0.25 + 1.0 + 1e-6 + 25.0)
    coef, clipped, total = policy.clip_units_(list(model.named_parameters()), pre)
    # row 0: ||W||=5 -> max 0.05 < ||G||=0.5 -> G * 0.1; row 1: ||W||=0 -> max 0.01*1e-3 = 1e-5 < 1 -> G * 1e-5.
    torch.testing.assert_close(model.body.weight.grad, torch.tensor([[0.03, 0.04], [1e-5, 0.0]]))
    # bias (1-D, one unit): ||W||=1 -> max 0.01 > ||G||=0.001 -> unchanged; the classifier is excluded.
    assert torch.equal(model.body.bias.grad, bias_before)
    assert model.classifier.weight.grad.tolist() == [[5.0, 0.0]]
    assert (clipped, total) == (2, 3)
    assert coef == pytest.approx(math.sqrt(0.05**2 + 1e-10 + 1e-6 + 25.0) / pre, rel=1e-6)
    assert policy.is_excluded("bert.cls.predictions.bias") and not policy.is_excluded("bert.encoder.cls_token")


# ---- names and bad input -----------------------------------------------------------------------------------------


def test_names():
    assert list_clip_policies() == ["fixed", "percentile", "step_length", "unitwise", "zscore"]
    assert isinstance(get_clip_policy("zscore", z_thresh=3.0), ZScoreClip)
    with pytest.raises(ValueError, match=r"Unknown clip policy 'autoclip'; valid names: fixed, percentile"):
        get_clip_policy("autoclip")
    with pytest.raises(ValueError, match="Invalid arguments for clip policy 'fixed'"):
        get_clip_policy("fixed", gamma=1.0)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("fixed", {"max_norm": -1.0}, "Invalid max_norm: -1.0"),
        ("fixed", {"max_norm": float("nan")}, "Invalid max_norm: nan"),
        ("step_length", {"gamma": 0}, "Invalid gamma: 0"),
        ("step_length", {"gamma": 1.0, "gamma_schedule": "decay"}, "Invalid gamma_schedule: 'decay'"),
        ("percentile", {"percentile": 101}, "Invalid percentile: 101"),
        ("percentile", {"history_size": 0}, "Invalid history_size: 0"),
        ("zscore", {"alpha": 1.0}, "Invalid alpha: 1.0"),
        ("zscore", {"warmup_steps": 2.5}, "Invalid warmup_steps: 2.5"),
        ("zscore", {"clip_option": "median"}, "Invalid clip_option: 'median'"),
        ("zscore", {"z_thresh": -2}, "Invalid z_thresh: -2"),
        ("unitwise", {"clip_factor": 0}, "Invalid clip_factor: 0"),
        ("unitwise", {"exclude": "classifier"}, "Invalid exclude: 'classifier'"),
    ],
)
def test_bad_policy_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_clip_policy(name, **kwargs)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="Invalid apply_to: 'params'"):
        ClipAwareSchedule("fixed", apply_to="params", max_norm=1.0)
    with pytest.raises(ValueError, match="apply_to='lr' needs a global threshold"):
        ClipAwareSchedule("unitwise", apply_to="lr")
    model = _model()
    with pytest.raises(ValueError, match="needs the model"):
        ClipAwareSchedule("unitwise").clip_(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1))


def test_register_custom_policy():
    class Half(ClipPolicy):
        name = "half_of_norm"

        def threshold(self, grad_norm, *, lr, base_lr):
            return grad_norm / 2

    register_clip_policy(Half)
    assert "half_of_norm" in list_clip_policies()
    with pytest.raises(ValueError, match="already used by FixedClip"):
        register_clip_policy(type("Other", (ClipPolicy,), {"name": "fixed"}))


# ---- ClipAwareSchedule in a plain loop -------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _loss(model, step, scale=1.0):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 5, generator=g) * (1 + step % 3)
    return torch.nn.functional.mse_loss(model(x), torch.randn(8, 2, generator=g)) * scale


def test_fixed_equals_clip_grad_norm():
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    schedule = ClipAwareSchedule("fixed", max_norm=0.3)
    for t in range(5):
        _loss(model, t).backward()
        stats = schedule.clip_(model, opt)
        opt.step()
        opt.zero_grad()
        _loss(ref, t).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        ref_opt.step()
        ref_opt.zero_grad()
        assert stats.grad_norm == float(norm) and stats.threshold == 0.3
        assert stats.coef == pytest.approx(min(1.0, 0.3 / (float(norm) + 1e-6)))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    assert schedule.num_clipped == 5


def test_apply_to_lr_scales_this_step_and_restores():
    """SGD update = eta * min(1, c/(G+1e-6)) * g, and a chainable scheduler stays identical to an unclipped twin."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)  # multiplies the *current* lr on step()
    twin_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    twin = torch.optim.lr_scheduler.ExponentialLR(twin_opt, gamma=0.9)
    schedule = ClipAwareSchedule("step_length", apply_to="lr", gamma=0.05).attach(opt, model)  # pre-hook mode
    scaled = 0
    for t in range(4):
        _loss(model, t).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        eta = opt.param_groups[0]["lr"]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        opt.step()  # no explicit call: observed in the step pre-hook
        s = min(1.0, (0.05 / eta) / (norm + 1e-6))
        scaled += s < 1
        for p, b, g in zip(model.parameters(), before, grads, strict=True):
            torch.testing.assert_close(p.detach(), b - eta * s * g, rtol=1e-6, atol=1e-7)
        assert schedule.last.lr_scale == pytest.approx(s) and schedule.last.effective_lr == pytest.approx(eta * s)
        sched.step()
        twin_opt.step()
        twin.step()
        opt.zero_grad()
        assert opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"]
        assert sched.state_dict() == twin.state_dict()
    assert scaled >= 2
    schedule.detach()


def test_non_finite_step_is_skipped_without_touching_params_or_state():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = ClipAwareSchedule("zscore", warmup_steps=2)
    for t in range(3):
        _loss(model, t).backward()
        schedule.clip_(model, opt)
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    policy_state = json.dumps(schedule.policy.state_dict())
    _loss(model, 3, scale=float("inf")).backward()
    stats = schedule.clip_(model, opt)
    opt.step()
    opt.zero_grad()
    assert stats.skipped and not math.isfinite(stats.grad_norm) and stats.effective_lr == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])
    assert json.dumps(schedule.policy.state_dict()) == policy_state  # the spike never reached the policy
    assert schedule.num_skipped == 1 and schedule.metrics()["clip/skipped"] == 1.0
    _loss(model, 4).backward()  # training continues normally
    assert not schedule.clip_(model, opt).skipped


@pytest.mark.parametrize("policy, kwargs", [("percentile", {"percentile": 30.0}), ("zscore", {"warmup_steps": 3})])
def test_state_round_trip_continues_bit_exactly(policy, kwargs):
    def train(model, opt, schedule, steps):
        for t in steps:
            _loss(model, t).backward()
            schedule.clip_(model, opt)
            opt.step()
            opt.zero_grad()

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    schedule = ClipAwareSchedule(policy, **kwargs)
    train(model, opt, schedule, range(8))

    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2, momentum=0.9)
    first = ClipAwareSchedule(policy, **kwargs)
    train(model2, opt2, first, range(4))
    saved = json.loads(json.dumps(first.state_dict()))  # what trainer_state.json keeps
    first.detach()
    resumed = ClipAwareSchedule(policy, **kwargs)
    resumed.load_state_dict(saved)
    train(model2, opt2, resumed, range(4, 8))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    assert resumed.state_dict() == schedule.state_dict()
    assert 0 < schedule.num_clipped < 8
    with pytest.raises(ValueError, match="Cannot load the state of clip policy"):
        ClipAwareSchedule("fixed", max_norm=1.0).load_state_dict(saved)


def test_metrics_rate_is_per_interval():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = ClipAwareSchedule("fixed", max_norm=1e-9)  # clips every step
    for t in range(3):
        _loss(model, t).backward()
        schedule.clip_(model, opt)
        opt.step()
        opt.zero_grad()
    metrics = schedule.metrics()
    assert set(metrics) == {
        "clip/grad_norm",
        "clip/threshold",
        "clip/coef",
        "clip/effective_lr",
        "clip/rate",
        "clip/skipped",
    }
    assert metrics["clip/rate"] == 1.0 and metrics["clip/threshold"] == 1e-9
    assert "clip/rate" not in schedule.metrics()  # no step since the last call


def test_one_schedule_per_optimizer():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ClipAwareSchedule("fixed", max_norm=1.0).attach(opt)
    with pytest.raises(RuntimeError, match="already has a clip-aware schedule attached"):
        ClipAwareSchedule("zscore").attach(opt)


# ---- Accelerate: the one call ------------------------------------------------------------------------------------


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_one_call(accelerator):
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    schedule = ClipAwareSchedule("percentile", percentile=50.0)
    history = []
    for t in range(6):  # 6 micro-batches = 3 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, t))
            stats = schedule.clip_(model, opt, accelerator)
            assert (stats is None) == (t % 2 == 0)  # no-op on the accumulation micro-step
            if stats is not None:
                # A second clip call in the same step (e.g. left in the loop) returns the same norm, clips nothing.
                again = accelerator.clip_grad_norm_(model.parameters(), 1e-12)
                assert float(again) == stats.grad_norm
            opt.step()
            opt.zero_grad()
        (_loss(ref, t) / 2).backward()
        if t % 2:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
            history.append(norm)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), float(np.percentile(history, 50.0)))
            ref_opt.step()
            ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert schedule.num_steps == 3


def test_step_length_warns_for_adam_with_grad_clipping():
    model = _model()
    with pytest.warns(UserWarning, match="Use apply_to='lr'"):
        ClipAwareSchedule("step_length", gamma=0.1).attach(torch.optim.AdamW(model.parameters()))
