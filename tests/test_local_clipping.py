"""CELGC (hf_clinic.distributed): single-process equivalences, bad input, and one real 2-process launch.

The launch (`tests/scripts/clip_local_ddp.py`) runs every multi-process check at once; the tests below read its
results. References: torch's `clip_grad_norm_` + `SGD`, a float64 re-implementation of the paper's algorithm (in
the launched script), the authors' update rule written out here, and all-reduce counts taken by the script's own
wrapper around `torch.distributed.all_reduce`.
"""

import json
import math
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from launch_utils import accelerate_launch

from hf_clinic import LocalClippingCallback, LocalGradientClipping
from hf_clinic.distributed import ReplicaAverager


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g) * 3, torch.randn(16, 1, generator=g)


def _lam(t):
    return 1.0 / (1 + 0.5 * t)


def test_single_process_step_equals_clip_then_sgd(accelerator):
    eta, gamma = 0.3, 0.2
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lam)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=eta)
    clipped = 0
    with LocalGradientClipping(accelerator, model, optimizer, gamma=gamma, local_steps=3) as celgc:
        for t in range(6):
            x, y = _batch(t)
            lr_t = eta * _lam(t)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            celgc.step()

            for group in ref_opt.param_groups:
                group["lr"] = lr_t
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(reference(x), y).backward()
            norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), gamma / lr_t)
            clipped += bool(lr_t * norm > gamma)
            ref_opt.step()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                assert torch.equal(p, q), f"step {t}"
    assert 0 < clipped < 6  # both regimes exercised
    assert celgc.num_rounds == 0  # nothing to average with one process
    assert celgc.schedule.num_clipped == clipped


def test_apply_to_lr_matches_authors_local_rule(accelerator):
    """apply_to="lr" scales the whole SGD update (momentum + weight decay) by min(eta, gamma/||g||)/eta, as in the
    authors' SGDClipGrad(clipping_option="local"): d = g + wd x; buf = mu buf + d; x -= min(eta, gamma/||g||) buf."""
    eta, gamma, mu, wd = 0.2, 0.1, 0.9, 0.01
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=eta, momentum=mu, weight_decay=wd)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = [p.detach().double().clone() for p in reference.parameters()]
    bufs = [None] * len(ref)
    with LocalGradientClipping(accelerator, model, optimizer, gamma=gamma, local_steps=1, apply_to="lr") as celgc:
        for t in range(5):
            x, y = _batch(t)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            assert optimizer.param_groups[0]["lr"] == eta  # restored right after the step
            optimizer.zero_grad()
            celgc.step()

            for q, r in zip(reference.parameters(), ref, strict=True):
                q.data.copy_(r)
            reference.zero_grad()
            torch.nn.functional.mse_loss(reference(x), y).backward()
            norm = math.sqrt(sum(float(q.grad.double().pow(2).sum()) for q in reference.parameters()))
            h = min(eta, gamma / norm)
            for i, q in enumerate(reference.parameters()):
                d = q.grad.double() + wd * ref[i]
                bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
                ref[i] = ref[i] - h * bufs[i]
    assert celgc.schedule.num_clipped > 0
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.1, "local_steps": 0}, "Invalid local_steps: 0"),
        ({"gamma": 0.1, "local_steps": 2.5}, "Invalid local_steps: 2.5"),
        ({"gamma": 0.1, "local_steps": True}, "Invalid local_steps: True"),
        ({"gamma": -1.0, "local_steps": 2}, "Invalid gamma: -1.0"),
        ({"gamma": 0.1, "local_steps": 2, "gamma_schedule": "cosine"}, "Invalid gamma_schedule: 'cosine'"),
        ({"gamma": 0.1, "local_steps": 2, "apply_to": "both"}, "Invalid apply_to: 'both'"),
    ],
)
def test_bad_arguments(accelerator, kwargs, match):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        LocalGradientClipping(accelerator, model, optimizer, **kwargs)
    with pytest.raises(ValueError, match=match):
        LocalClippingCallback(**kwargs)


@pytest.mark.parametrize("backend", [DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA])
def test_refuses_sharded_backends(backend):
    fake = types.SimpleNamespace(distributed_type=backend, num_processes=2)
    with pytest.raises(NotImplementedError, match=backend.name):
        LocalGradientClipping(fake, _model(), None, gamma=0.1, local_steps=2)


def test_callback_refuses_deepspeed_args():
    args = types.SimpleNamespace(deepspeed="ds_config.json", fsdp="")
    with pytest.raises(NotImplementedError, match="DEEPSPEED"):
        LocalClippingCallback(gamma=0.1, local_steps=2).on_init_end(args, None, None, model=_model())


def test_replica_averager_bad_input():
    with pytest.raises(ValueError, match="Invalid bucket_cap_mb: 0"):
        ReplicaAverager(_model(), bucket_cap_mb=0)
    with pytest.raises(ValueError, match="needs the optimizer"):
        ReplicaAverager(_model(), average_optimizer_state=True)


# ---- real 2-process launch -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("celgc")
    accelerate_launch(["tests/scripts/clip_local_ddp.py", str(out)], timeout=600)
    with open(out / "results.json") as f:
        return json.load(f)


def test_launch_is_really_distributed(launched):
    assert launched["distributed_type"] == "MULTI_CPU"


def test_i1_trajectory_equals_synchronous_local_clipped_sgd(launched):
    r = launched["I1"]
    assert r["max_param_err"] < 1e-5 and r["max_buffer_err"] < 1e-5
    assert all(r["replicas_identical_after_step"]) and all(r["buffers_identical_after_step"])
    assert r["max_rel_norm_err"] < 1e-5 and r["ref_norms_differ_across_workers"]  # local norms: no grad all-reduce
    assert 0 < r["ref_clipped_worker_steps"] < 24


def test_i4_replicas_differ_between_syncs_and_agree_after(launched):
    r = launched["I4"]
    assert r["max_param_err"] < 1e-5 and r["max_buffer_err"] < 1e-5
    expected = [(t + 1) % 4 == 0 for t in range(12)]
    assert r["replicas_identical_after_step"] == expected
    assert r["buffers_identical_after_step"] == expected


def test_all_reduce_count_is_steps_over_i(launched):
    assert launched["I1"]["all_reduce_calls"] == 12
    assert launched["I4"]["all_reduce_calls"] == 3
    assert launched["accumulation"] == {"all_reduce_calls": 2, "rounds": 2}  # 8 micro-batches, GA=2, I=2


def test_rounds_bytes_and_clip_rate_are_logged(launched):
    for key, rounds in (("I1", 12), ("I4", 3)):
        r = launched[key]
        assert r["rounds"] == rounds and r["metrics"]["local/rounds"] == rounds
        assert r["metrics"]["local/bytes_all_reduced"] == rounds * r["expected_bytes_per_round"]
        assert r["metrics"]["local/clip_rate"] == pytest.approx(r["clip_rate_expected"])


def test_bucketed_average(launched):
    b = launched["buckets"]
    assert b["all_reduce_calls"] == b["collectives"] == 2
    assert b["values"] == b["expected"]


def test_trainer_local_clipping(launched):
    r = launched["trainer"]
    # I=2 over 6 steps, plus a forced average before the save at step 3 and at the end of training.
    assert r["identical_after_step"] == [False, True, True, False, True, True]
    assert all(r["local_norms_differ"])  # DDP never all-reduced the gradients
    assert r["final_identical"]
    assert r["checkpoint3_matches_rank1_step3"] == 0.0
    assert r["logged_rounds"] == [0, 1, 2, 2, 3, 4]
    assert r["all_reduce_calls"] == 4
    assert {"local/rounds", "local/clip_rate", "clip/rate", "clip/threshold"} <= set(r["clip_keys"])


def test_clip_callback_under_ddp(launched):
    r = launched["clip_callback"]
    assert r["same_state"] and r["final_identical"] and r["history_len"] == 4
