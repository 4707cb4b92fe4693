"""Issue 3: `hf_clinic.create_optimizer(...)` in a plain Accelerate loop (single process, CPU).

bf16 autocast with gradient accumulation and `accelerator.clip_grad_norm_`, and fp16 steps skipped on overflow. The
multi-process loop (DDP) lives in `tests/scripts/integ_ddp.py`. References: an unwrapped copy trained with
`torch.autocast`, manual loss scaling and `torch.nn.utils.clip_grad_norm_`.
"""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_trainer_integration import no_dropout_bert
from tiny_models import classification_batch

import hf_clinic


NAMES = ["radam_sgd", "lamb", "lars", "gsignsgd"]
LR = {"radam_sgd": 1e-3, "lamb": 1e-2, "lars": 1.0, "gsignsgd": 1e-3}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; each test here builds its own Accelerator configuration.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def batch(step, k):
    return classification_batch(batch_size=4, generator=torch.Generator().manual_seed(100 * step + k))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_accumulation_and_clipping(name):
    steps, micro, max_norm = 3, 2, 0.05
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=micro)
    model = no_dropout_bert()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=LR[name], weight_decay=0.01)
    optimizer = hf_clinic.create_optimizer(model, name, **kwargs)
    reference_optimizer = hf_clinic.create_optimizer(reference, name, **kwargs)
    model, optimizer = accelerator.prepare(model, optimizer)

    matmul_dtypes = set()
    model.classifier.register_forward_hook(lambda module, args, out: matmul_dtypes.add(out.dtype))
    norms = []
    for step in range(steps):
        for k in range(micro):
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch(step, k)).loss)
                if accelerator.sync_gradients:
                    norms.append(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                optimizer.step()
                optimizer.zero_grad()
    assert matmul_dtypes == {torch.bfloat16}  # autocast was on
    assert len(norms) == steps

    for step in range(steps):
        for k in range(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = reference(**batch(step, k)).loss
            (loss / micro).backward()
        reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        assert norms[step] == pytest.approx(reference_norm.item(), rel=1e-6)
        assert reference_norm > max_norm  # clipping was active
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    inner = optimizer.optimizer
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert all(t.dtype == torch.float32 for s in inner.state.values() for t in s.values() if t.is_floating_point())
    assert inner.telemetry() == pytest.approx(reference_optimizer.telemetry(), rel=1e-5)


@pytest.mark.parametrize("name", NAMES + ["radam"])
def test_overflow_skips_the_step_without_touching_optimizer_state(name):
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    # Accelerate builds a GradScaler for fp16 only on accelerators (accelerator.py, mixed-precision set-up), never on
    # CPU. Give it torch's real GradScaler for CPU exactly where it would put its own, before `prepare`; everything
    # below (fp16 autocast, scaled backward, unscale in clip_grad_norm_, skipped step) is Accelerate's own code.
    assert accelerator.scaler is None
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    model = no_dropout_bert()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=LR.get(name, 1e-3), weight_decay=0.01)
    optimizer = hf_clinic.create_optimizer(model, name, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    inner = optimizer.optimizer

    def train_step(data):
        accelerator.backward(model(**data).loss)  # the prepared forward runs under fp16 autocast
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return norm

    # Step 1: a loss scale of 2**40 overflows fp16 activations' gradients: a genuine overflow.
    before = [p.detach().clone() for p in model.parameters()]
    norm = train_step(batch(0, 0))
    assert not torch.isfinite(norm)
    assert accelerator.optimizer_step_was_skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert len(inner.state) == 0  # no moments, no step count
    assert inner.telemetry() == {}
    assert scheduler.get_last_lr() == [kwargs["lr"]] * len(inner.param_groups)
    assert accelerator.scaler.get_scale() == 2.0**10

    # Step 2 equals the *first* step of a fresh optimizer, with the same (exact, power-of-two) loss scaling.
    train_step(batch(1, 0))
    assert not accelerator.optimizer_step_was_skipped
    reference_optimizer = hf_clinic.create_optimizer(reference, name, **kwargs)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = reference(**batch(1, 0)).loss
    (loss.float() * 2.0**10).backward()
    for p in reference.parameters():
        p.grad.mul_(2.0**-10)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    reference_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(s["step"].item() == 1 for s in inner.state.values())
    assert inner.telemetry() == reference_optimizer.telemetry()
    assert scheduler.get_last_lr() == [kwargs["lr"] / 2] * len(inner.param_groups)
