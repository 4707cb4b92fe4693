"""Issue 3: PEFT LoRA with every hf-clinic optimizer name through the Trainer (tiny BERT from a config).

References: PEFT's own `requires_grad` flags (the set of trainable tensors), the untouched base weights, and a model
rebuilt from the saved adapter with `PeftModel.from_pretrained`.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from test_trainer_integration import dataset, make_args, no_dropout_bert
from tiny_models import classification_batch
from transformers import Trainer

from hf_clinic import list_optimizers


def lora(model):
    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))


@pytest.mark.parametrize("name", list_optimizers())
def test_lora_trains_only_the_adapters_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    model = lora(no_dropout_bert())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # RAdam's default warm phase leaves the parameters alone until rho_t > 5 (step 6).
    steps = 6 if name == "radam" else 2
    args = make_args(tmp_path, optim=name, max_steps=steps, learning_rate=1e-2, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()

    optimizer = trainer.optimizer.optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"

    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "classifier" in k for k in saved)

    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(no_dropout_bert(), str(tmp_path / "adapter"))
    batch = classification_batch(batch_size=4, generator=torch.Generator().manual_seed(7))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
