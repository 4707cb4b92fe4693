"""Clip-aware schedules inside `transformers.Trainer` (tiny BERT, CPU).

References: the stock Trainer's own clipping (`max_grad_norm`), an uninterrupted run for resume, the linear schedule
formula and the clip-coefficient formula for the logged values, and parameter/optimizer-state snapshots for skips.
"""

import copy
import functools
import json
import math
import types

import pytest
import torch
from tiny_models import classification_batch, tiny_bert
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType

import hf_clinic  # noqa: F401  (registers the scheduler names)
from hf_clinic import ClipAwareCallback, ClipAwareLR
from hf_clinic.clipping.schedule import check_clip_backend


def dataset(n=48, seed=1):
    data = classification_batch(n, generator=torch.Generator().manual_seed(seed))
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def make_args(out, **overrides):
    kwargs = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=2e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        max_grad_norm=0.5,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(args, callbacks=(), resume=None, model=None):
    torch.manual_seed(0)
    trainer = Trainer(model or tiny_bert(), args, train_dataset=dataset(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class StopAt(TrainerCallback):
    """Interrupts a run after `step` optimizer steps (same schedule as the full run, unlike a smaller max_steps)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_default_callback_is_the_builtin_clipping_plus_telemetry(tmp_path):
    stock = train(make_args(tmp_path / "a"))
    ours = train(make_args(tmp_path / "b"), [ClipAwareCallback()])
    for s, o in zip(logs(stock), logs(ours), strict=True):
        assert (s["loss"], s["grad_norm"], s["learning_rate"]) == (o["loss"], o["grad_norm"], o["learning_rate"])
        assert o["clip/grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-7)
        assert o["clip/threshold"] == 0.5  # inherited from max_grad_norm
        assert o["clip/rate"] == float(s["grad_norm"] > 0.5)
        assert o["clip/coef"] == pytest.approx(min(1.0, 0.5 / (s["grad_norm"] + 1e-6)), rel=1e-6)
        assert o["clip/skipped"] == 0.0
    assert any(o["clip/rate"] == 1.0 for o in logs(ours))
    for p, q in zip(stock.model.parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_continues_exactly(tmp_path, restore_flag):
    def callback():
        return ClipAwareCallback("zscore", warmup_steps=2, z_thresh=0.5, max_grad_norm=5.0)

    kwargs = dict(save_strategy="steps", save_steps=3, restore_callback_states_from_checkpoint=restore_flag)
    full = train(make_args(tmp_path / "full", **kwargs), [callback()])
    train(make_args(tmp_path / "part", **kwargs), [callback(), StopAt(3)])
    resumed_cb = callback()
    resumed = train(make_args(tmp_path / "part", **kwargs), [resumed_cb], resume=str(tmp_path / "part/checkpoint-3"))

    # The resumed log_history starts with the checkpoint's three entries.
    assert [h["loss"] for h in logs(full)] == [h["loss"] for h in logs(resumed)]
    assert [h["clip/threshold"] for h in logs(full)] == [h["clip/threshold"] for h in logs(resumed)]
    assert any(h["clip/rate"] for h in logs(full)[3:])  # the restored EMA statistics mattered
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    active = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, ClipAwareCallback))
    full_cb = next(cb for cb in full.callback_handler.callbacks if isinstance(cb, ClipAwareCallback))
    assert active.schedule.state_dict()["policy_state"] == full_cb.schedule.state_dict()["policy_state"]


def test_scheduler_name_from_the_command_line_resumes_exactly(tmp_path):
    def parse(out):
        argv = [
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "6",
            "--learning_rate", "2e-3", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "steps", "--save_steps", "3", "--seed", "0",
            "--lr_scheduler_type", "clip_aware",
            "--lr_scheduler_kwargs", json.dumps({"clip_policy": "percentile", "percentile": 40.0}),
        ]  # fmt: skip
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
        return args

    full = train(parse(tmp_path / "full"))
    assert full.args.lr_scheduler_type == SchedulerType("clip_aware")
    assert isinstance(full.lr_scheduler, ClipAwareLR)
    train(parse(tmp_path / "part"), [StopAt(3)])
    resumed = train(parse(tmp_path / "part"), resume=str(tmp_path / "part/checkpoint-3"))
    assert [h["loss"] for h in logs(full)] == [h["loss"] for h in logs(resumed)]
    assert [h["clip/threshold"] for h in logs(full)] == [h["clip/threshold"] for h in logs(resumed)]
    assert resumed.lr_scheduler.schedule.state_dict() == full.lr_scheduler.schedule.state_dict()
    assert {"clip/rate", "clip/threshold", "clip/grad_norm"} <= set(logs(full)[-1])  # via optimizer telemetry


def test_step_length_schedule_scales_the_lr(tmp_path):
    gamma = 1e-3
    args = make_args(
        tmp_path,
        lr_scheduler_type="clip_step_length",
        lr_scheduler_kwargs={"gamma": gamma, "apply_to": "lr"},
        max_grad_norm=1.0,  # replaced by the policy
    )
    trainer = train(args)
    scaled = 0
    for t, h in enumerate(logs(trainer)):
        eta = 2e-3 * (6 - t) / 6  # linear decay, no warm-up: the logged lr is the schedule's, never the scaled one
        assert h["learning_rate"] == pytest.approx(eta, rel=1e-12)
        coef = min(1.0, (gamma / eta) / (h["grad_norm"] + 1e-6))
        assert h["clip/threshold"] == pytest.approx(gamma / eta, rel=1e-12)
        assert h["clip/lr_scale"] == pytest.approx(coef, rel=1e-6)
        assert h["clip/effective_lr"] == pytest.approx(eta * coef, rel=1e-6)
        scaled += coef < 1
    assert scaled > 0


class _Poison(TrainerCallback):
    """Makes the loss of optimizer step 2 infinite, and snapshots parameters and optimizer state after every step."""

    def __init__(self):
        self.params, self.states = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model._hf_test_poison = state.global_step == 1

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params.append([p.detach().clone() for p in model.parameters()])
        self.states.append(copy.deepcopy(optimizer.state_dict()["state"]))


def test_non_finite_step_is_skipped_in_the_trainer(tmp_path):
    model = tiny_bert()
    original_forward = model.forward

    @functools.wraps(original_forward)  # keeps the signature the Trainer uses to pick dataset columns
    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        if getattr(model, "_hf_test_poison", False):
            out.loss = out.loss * math.inf
        return out

    model.forward = forward
    poison = _Poison()
    trainer = train(make_args(tmp_path, max_steps=4), [ClipAwareCallback("fixed", max_norm=1.0), poison], model=model)
    p1, p2, p3 = poison.params[0], poison.params[1], poison.params[2]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))  # step 2: nothing moved
    assert not all(torch.equal(a, b) for a, b in zip(p2, p3, strict=True))  # step 3 trains again
    s1, s2 = poison.states[0], poison.states[1]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert [h["clip/skipped"] for h in logs(trainer)] == [0.0, 1.0, 1.0, 1.0]


def test_refuses_deepspeed_and_fsdp():
    for args, name in ((types.SimpleNamespace(deepspeed="ds.json", fsdp=""), "DEEPSPEED"),
                       (types.SimpleNamespace(deepspeed=None, fsdp="full_shard"), "FSDP")):  # fmt: skip
        with pytest.raises(NotImplementedError, match=f"ClipAwareCallback does not support distributed_type={name}"):
            ClipAwareCallback().on_init_end(args, None, None)
    with pytest.raises(NotImplementedError, match="DeepSpeed keeps the gradients inside its engine"):
        check_clip_backend("DEEPSPEED")


def test_callback_and_clip_scheduler_conflict(tmp_path):
    kwargs = {"gamma": 1.0, "apply_to": "lr"}
    args = make_args(tmp_path, lr_scheduler_type="clip_step_length", lr_scheduler_kwargs=kwargs)
    with pytest.raises(RuntimeError, match="only one schedule"):
        train(args, [ClipAwareCallback("zscore")])


def test_scheduler_name_bad_kwargs(tmp_path):
    with pytest.raises(ValueError, match="needs lr_scheduler_kwargs=\\{'gamma'"):
        train(make_args(tmp_path, lr_scheduler_type="clip_step_length"))
    with pytest.raises(ValueError, match="Invalid base_scheduler 'clip_aware'"):
        train(make_args(tmp_path, lr_scheduler_type="clip_aware",
                        lr_scheduler_kwargs={"clip_policy": "zscore", "base_scheduler": "clip_aware"}))  # fmt: skip
    with pytest.raises(ValueError, match="needs max_norm"):
        train(make_args(tmp_path, lr_scheduler_type="clip_aware"))


def test_fails_loudly_when_the_trainer_bypasses_the_accelerator(tmp_path):
    """E.g. SageMaker model parallelism or mixed DTensor meshes: the Trainer computes the norm without the Accelerator."""
    torch.manual_seed(0)
    trainer = Trainer(
        tiny_bert(), make_args(tmp_path, max_steps=1), train_dataset=dataset(), callbacks=[ClipAwareCallback()]
    )
    trainer._clip_grad_norm = lambda model: torch.tensor(0.0)
    trainer._get_grad_norm = lambda model, grad_norm=None: torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="did not go through Accelerator.clip_grad_norm_"):
        trainer.train()
