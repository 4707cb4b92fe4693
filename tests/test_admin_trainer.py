"""AdminCallback in a real `transformers.Trainer`: what is profiled when, on which batches, and resume.

References: the batches the Trainer itself feeds to the model (recorded by a forward hook), the optimizer's own param
groups, the ω stored in the checkpoint's safetensors file, and `apply_admin` run by hand on the recorded batches.
"""

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from tiny_models import VOCAB, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_clinic.admin import AdminCallback, apply_admin


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def dataset(n=16, seq_len=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def omegas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("admin_omega")}


class RecordInputs:
    """Forward pre-hook recording (grad enabled?, input_ids) of every top-level call."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append((torch.is_grad_enabled(), kwargs["input_ids"].clone()))


def test_callback_profiles_the_first_optimizer_step_batches_and_trains_omega(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert(**NO_DROPOUT)
    initial = copy.deepcopy(model)
    recorder = RecordInputs(model)
    callback = AdminCallback()
    trainer = Trainer(
        model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=dataset(), callbacks=[callback]
    )
    # on_init_end: ω exists (at 1, plain Post-LN) before the optimizer; nothing has run yet.
    assert trainer.optimizer is None and recorder.calls == []
    assert all(torch.all(p == 1) for p in omegas(model).values()) and len(omegas(model)) == 4
    trainer.train()

    profiling = [ids for grad, ids in recorder.calls if not grad]
    training = [ids for grad, ids in recorder.calls if grad]
    distinct = []
    for ids in profiling:
        if not any(torch.equal(ids, d) for d in distinct):
            distinct.append(ids)
    # Default: gradient_accumulation_steps micro-batches = exactly the first optimizer step's data, and training then
    # starts with those very batches (peeking did not advance the sampler).
    assert len(distinct) == 2 and len(training) == 4
    assert torch.equal(distinct[0], training[0]) and torch.equal(distinct[1], training[1])
    assert recorder.calls[0][0] is False  # profiling happened before any training forward

    # Same ω as applying Admin by hand to the initial model on those two batches.
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in distinct]
    expected = apply_admin(initial, batches).omegas()
    assert callback.profiled and callback.report.omega_init == "profile"
    assert callback.report.omegas() == pytest.approx(expected, rel=1e-6)
    assert model.config.admin["omega_init"] == "profile"

    # ω is in the Trainer's optimizer, without weight decay, and was trained away from its profiled value.
    groups = trainer.optimizer.param_groups
    for name, p in omegas(model).items():
        group = next(g for g in groups if any(q is p for q in g["params"]))
        assert group["weight_decay"] == 0.0, name
    site = callback.report.sites[1]
    trained = omegas(model)[site.name + ".admin_omega"]
    assert not torch.allclose(trained, torch.full_like(trained, site.omega))

    # Logged through the Trainer's own logs.
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("admin/omega_mean" in h and "admin/omega_max" in h for h in logs)
    assert logs[-1]["admin/omega_mean"] == pytest.approx(
        torch.cat([p.detach() for p in omegas(model).values()]).mean().item(), rel=1e-5
    )


class OmegaAtTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.values = {n: p.detach().clone() for n, p in omegas(model).items()}


def test_resume_keeps_the_checkpoint_omega(tmp_path):
    torch.manual_seed(0)
    first = Trainer(
        model=tiny_bert(),
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=dataset(),
        callbacks=[AdminCallback()],
    )
    first.train()
    checkpoint = os.path.join(tmp_path, "checkpoint-2")
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith("admin_omega")}
    assert len(stored) == 4

    torch.manual_seed(123)  # a different fresh model: nothing may come from it
    callback, probe = AdminCallback(), OmegaAtTrainBegin()
    resumed = Trainer(
        model=tiny_bert(),
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=dataset(),
        callbacks=[callback, probe],
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert not callback.profiled and callback.report.omega_init == "checkpoint"
    assert callback.report.omegas() == pytest.approx(
        [stored[s.name + ".admin_omega"].mean().item() for s in callback.report.sites]
    )
    assert probe.values.keys() == stored.keys()
    assert all(torch.equal(probe.values[k], stored[k]) for k in stored)
    # ... and training continued from there exactly as the uninterrupted run did.
    final_first, final_resumed = omegas(first.model), omegas(resumed.model)
    assert all(torch.allclose(final_first[k], final_resumed[k], atol=1e-6) for k in final_first)


def test_callback_closed_form_and_peft(tmp_path):
    model = tiny_bert()
    callback = AdminCallback(omega="closed_form")
    Trainer(model=model, args=args(tmp_path), train_dataset=dataset(), callbacks=[callback]).train()
    assert callback.report.omega_init == "closed_form" and not callback.profiled

    # PEFT: profile first (apply_admin on the base model), then wrap; the callback only logs ω, which PEFT froze.
    base = tiny_bert()
    apply_admin(base, [{k: v[None] for k, v in dataset(n=1)[0].items()}])
    before = {n: p.clone() for n, p in omegas(base).items()}
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainer = Trainer(model=peft_model, args=args(tmp_path), train_dataset=dataset(), callbacks=[AdminCallback()])
    trainer.train()
    assert all(torch.equal(before[n], p) for n, p in omegas(base).items())
    assert "admin/omega_mean" in trainer.state.log_history[0]

    with pytest.raises(ValueError, match="PEFT model without Admin"):
        Trainer(
            model=get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")),
            args=args(tmp_path),
            train_dataset=dataset(),
            callbacks=[AdminCallback()],
        )
    plain = tiny_bert()
    with pytest.raises(ValueError, match="optimizer passed with `optimizers=` would not contain"):
        Trainer(
            model=plain,
            args=args(tmp_path),
            train_dataset=dataset(),
            callbacks=[AdminCallback()],
            optimizers=(torch.optim.SGD(plain.parameters(), lr=0.1), None),
        )
    assert not omegas(plain)
