"""Issue 3 on the real all-MiniLM-L6-v2 checkpoint: the Trainer's steps equal a hand-written loop, and LoRA works.

Reference: the same checkpoint trained by a plain PyTorch loop with the optimizer built by hand from
`hf_clinic.param_groups` (same batch, same clipping, constant learning rate).
"""

import copy

import pytest
import torch
from test_peft_integration import lora
from test_trainer_integration import make_args
from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, default_data_collator

from hf_clinic import OPTIMIZERS, param_groups


TEXTS = [
    ("a gripping, beautifully acted film", 1),
    ("the plot collapses under its own weight", 0),
    ("one of the funniest movies of the year", 1),
    ("tedious and far too long", 0),
    ("warm, witty and wise", 1),
    ("a waste of a talented cast", 0),
    ("an honest, moving portrait", 1),
    ("flat characters and a predictable ending", 0),
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    encoded = tokenizer([t for t, _ in TEXTS], padding="max_length", max_length=16, truncation=True)
    examples = [
        {**{k: torch.tensor(v[i]) for k, v in encoded.items()}, "labels": label} for i, (_, label) in enumerate(TEXTS)
    ]
    return model, examples


@pytest.mark.parametrize(("name", "lr"), [("lamb", 1e-2), ("lars", 5.0), ("radam_sgd", 1e-3)])
def test_trainer_steps_equal_a_hand_written_loop(minilm, name, lr, tmp_path):
    base, examples = minilm
    model, reference = copy.deepcopy(base), copy.deepcopy(base)
    args = make_args(
        tmp_path,
        optim=name,
        max_steps=2,
        per_device_train_batch_size=len(examples),
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",  # the same row order as the hand-written loop
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()

    info = OPTIMIZERS[name]
    optimizer = info.optimizer_class(param_groups(reference, 0.01), lr=lr, weight_decay=0.01, **info.defaults)
    batch = default_data_collator(examples)
    for _ in range(2):
        reference(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    moved = 0
    for (n, p), (_, q), (_, p0) in zip(
        model.named_parameters(), reference.named_parameters(), base.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
        moved += not torch.equal(p, p0)
    assert moved > 0.9 * sum(1 for _ in base.parameters())  # RAdam's SGD warm phase leaves zero-grad rows alone

    logs = [log for log in trainer.state.log_history if "loss" in log]
    telemetry = {"lamb": "lamb/trust_ratio_median", "lars": "lars/trust_ratio_median", "radam_sgd": "radam/rho_t"}
    assert all(telemetry[name] in log for log in logs)


def test_lora_on_minilm_saves_and_reloads(minilm, minilm_path, tmp_path):
    base, examples = minilm
    model = lora(copy.deepcopy(base))
    args = make_args(tmp_path, optim="lamb", max_steps=2, learning_rate=1e-2, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.optimizer.param_groups for p in g["params"]} == trainable
    trainer.save_model(str(tmp_path / "adapter"))

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    batch = default_data_collator(examples)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
