"""Admin keeps working with the rest of the stack: checkpointing, torch.compile, attention backends, bf16, deepcopy,
PEFT LoRA, weight decay, a plain Accelerate loop, and save/load (hf_clinic loader vs stock `from_pretrained`).

References: the same model without the feature (eager attention, no checkpointing, fp32, no LoRA, a plain PyTorch
loop instead of Accelerate), and stock transformers' own loading report.
"""

import copy
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from peft import LoraConfig, get_peft_model
from tiny_models import (
    classification_batch,
    seq2seq_batch,
    tiny_bert,
    tiny_bert_config,
    tiny_marian,
    tiny_marian_config,
    tiny_t5,
    tiny_t5_config,
)
from transformers import (
    BertForSequenceClassification,
    MarianMTModel,
    T5ForConditionalGeneration,
    Trainer,
)

import hf_clinic
from hf_clinic.admin import MARKER_KEY, apply_admin, export_vanilla, load_admin


NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "marian": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "t5": dict(dropout_rate=0.0),
}
BUILD = {"bert": tiny_bert, "marian": tiny_marian, "t5": tiny_t5}
BATCH = {"bert": classification_batch, "marian": seq2seq_batch, "t5": seq2seq_batch}


def omegas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("admin_omega")}


def admin_model(kind, **overrides):
    """An Admin model with non-trivial per-dimension ω (as after training)."""
    model = BUILD[kind](**overrides)
    apply_admin(model, omega=1.0 if kind == "t5" else "closed_form")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in omegas(model).values():
            p.copy_(0.5 + 2.0 * torch.rand(p.shape, generator=g))
    return model


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("kind", ["bert", "marian", "t5"])
def test_gradient_checkpointing_gives_identical_gradients(kind):
    model = admin_model(kind, **NO_DROPOUT[kind]).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = BATCH[kind]()
    model(**batch).loss.backward()
    checkpointed(**batch).loss.backward()
    reference = dict(model.named_parameters())
    for name, p in checkpointed.named_parameters():
        if reference[name].grad is None:
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, reference[name].grad, atol=1e-6, rtol=1e-5), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in omegas(checkpointed).values())


@pytest.mark.parametrize("kind", ["bert", "marian", "t5"])
def test_torch_compile_fullgraph(kind):
    # fullgraph=True: the hooks (including Marian's stateful capture) trace without a graph break. Marian, the
    # stateful wiring, also goes through AOTAutograd and backward; the stateless ones only through Dynamo (cheaper).
    torch._dynamo.reset()
    model = admin_model(kind, **NO_DROPOUT[kind]).train()
    batch = BATCH[kind]()
    eager_loss = model(**batch).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in omegas(model).items()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager" if kind == "marian" else "eager", fullgraph=True)
    loss = compiled(**batch).loss
    loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    for name, p in omegas(model).items():
        assert torch.allclose(p.grad, eager_grads[name], rtol=1e-4, atol=1e-7), name


def test_sdpa_and_eager_attention_agree():
    outputs = {}
    for impl in ("eager", "sdpa"):
        for kind, cls, config in (
            ("bert", BertForSequenceClassification, tiny_bert_config()),
            ("marian", MarianMTModel, tiny_marian_config()),
            ("t5", T5ForConditionalGeneration, tiny_t5_config()),
        ):
            torch.manual_seed(0)
            model = cls._from_config(config, attn_implementation=impl).eval()
            assert model.config._attn_implementation == impl
            apply_admin(model, omega=1.0 if kind == "t5" else "closed_form")
            with torch.no_grad():
                for p in omegas(model).values():
                    p.mul_(torch.linspace(0.7, 1.6, p.shape[0]))
                outputs[impl, kind] = model(**BATCH[kind]()).logits
    for kind in ("bert", "marian", "t5"):
        assert rel(outputs["sdpa", kind], outputs["eager", kind]) < 1e-5


def test_bf16_keeps_omega_in_fp32():
    model = admin_model("marian").eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    # A bf16 model: apply Admin after casting; ω is created in fp32 and the hooks keep bf16 activations.
    low = tiny_marian().to(torch.bfloat16).eval()
    low.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "admin_omega" not in k and "HF_CLINIC" not in k}, strict=False
    )
    apply_admin(low, omega="closed_form")
    with torch.no_grad():
        for name, p in omegas(low).items():
            assert p.dtype == torch.float32
            p.copy_(omegas(model)[name])
        out = low(**batch).logits
    assert out.dtype == torch.bfloat16 and rel(out, reference) < 5e-2
    # Mixed precision (autocast, as Trainer(bf16=True)): ω stays fp32 and gets an fp32 gradient.
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    for p in omegas(model).values():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind", ["bert", "marian", "t5"])
def test_deepcopy_is_wired_to_its_own_omega(kind):
    model = admin_model(kind).eval()
    batch = BATCH[kind]()
    with torch.no_grad():
        before = model(**batch).logits
        twin = copy.deepcopy(model)
        for p in omegas(twin).values():
            p.mul_(1.7)
        changed = twin(**batch).logits
        after = model(**batch).logits
    assert torch.equal(before, after)  # the copy's hooks did not read the original ω (nor vice versa)
    assert rel(changed, before) > 1e-3
    originals = {id(p) for p in omegas(model).values()}
    assert not originals & {id(p) for p in omegas(twin).values()}


def test_peft_lora_profile_first_then_wrap():
    model = tiny_marian()
    batch = seq2seq_batch()
    apply_admin(model, [batch])  # profile first ...
    with torch.no_grad():
        for p in omegas(model).values():
            p.mul_(torch.linspace(0.8, 1.5, p.shape[0]))
    model.eval()
    with torch.no_grad():
        admin_out = model(**batch).logits
    # ... then wrap. LoRA on Linears *inside* the branches: Admin's read-only capture sits on the original module.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]))
    assert not any(p.requires_grad for p in omegas(peft_model).values())  # frozen with the base weights
    peft_model.eval()
    with torch.no_grad():
        assert rel(peft_model(**batch).logits, admin_out) < 1e-6  # LoRA B = 0 at init
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**batch).logits
        assert rel(tuned, admin_out) > 1e-4
        merged = peft_model.merge_and_unload()
        assert rel(merged(**batch).logits, tuned) < 1e-5
        stock = export_vanilla(merged)
        assert rel(stock(**batch).logits, tuned) < 1e-5
    # BERT: LoRA on `dense`, inside the module whose residual argument Admin scales.
    bert = admin_model("bert").eval()
    with torch.no_grad():
        ref = bert(**classification_batch()).logits
        wrapped = get_peft_model(bert, LoraConfig(r=4, target_modules=["query", "value", "dense"])).eval()
        assert rel(wrapped(**classification_batch()).logits, ref) < 1e-6
    with pytest.raises(ValueError, match="Profile first, then wrap"):
        apply_admin(get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"])), omega="closed_form")


def test_omega_gets_no_weight_decay():
    for kind in ("bert", "marian", "t5"):
        model = admin_model(kind)
        decayed = set(Trainer.get_decay_parameter_names(None, model))
        names = set(omegas(model))
        assert names and not names & decayed, kind
        groups = hf_clinic.param_groups(model, weight_decay=0.01)
        ids = {id(p) for p in omegas(model).values()}
        for group in groups:
            if ids & {id(p) for p in group["params"]}:
                assert group["weight_decay"] == 0.0


def test_plain_accelerate_loop_trains_omega():
    # apply_admin before `accelerator.prepare`; gradient accumulation through `accelerator.accumulate`. Reference: the
    # same Admin model trained by a plain PyTorch loop with manual accumulation.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = tiny_marian(**NO_DROPOUT["marian"])
    batches = [seq2seq_batch(generator=torch.Generator().manual_seed(k)) for k in range(4)]
    report = apply_admin(model, batches[:2])
    reference = copy.deepcopy(model)

    def optimizer_for(m):
        return torch.optim.AdamW(hf_clinic.param_groups(m, weight_decay=0.1), lr=1e-2)

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model, optimizer = accelerator.prepare(model, optimizer_for(model))
        model.train()
        for batch in batches:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    ref_optimizer = optimizer_for(reference)
    reference.train()
    for k, batch in enumerate(batches):
        (reference(**batch).loss / 2).backward()
        if k % 2 == 1:
            ref_optimizer.step()
            ref_optimizer.zero_grad()

    trained = dict(accelerator.unwrap_model(model).named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(trained[name], p, atol=1e-6, rtol=1e-5), name
    for entry in report.sites:
        if not entry.fixed:  # ω was trained away from its profiled value, without weight decay
            omega = trained[entry.name + ".admin_omega"]
            assert not torch.allclose(omega, torch.full_like(omega, entry.omega))
            group = next(g for g in optimizer.param_groups if any(q is omega for q in g["params"]))
            assert group["weight_decay"] == 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_save_and_load(tmp_path):
    model = admin_model("marian").eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)

    # Stock loading drops ω; it warns, and its report names the marker key that says what to do.
    records = _Records()
    target = logging.getLogger("transformers.modeling_utils")
    target.addHandler(records)
    try:
        stock = MarianMTModel.from_pretrained(tmp_path).eval()
    finally:
        target.removeHandler(records)
    report = "\n".join(records.messages)
    assert "LOAD REPORT" in report and MARKER_KEY in report and "admin_omega" in report
    assert "load_with_hf_clinic_load_admin" in MARKER_KEY
    with torch.no_grad():
        assert rel(stock(**batch).logits, expected) > 1e-3  # wrong outputs, as the warning says
    assert stock.config.admin["note"].startswith("hf-clinic Admin checkpoint")
    with pytest.raises(ValueError, match="stock `from_pretrained`.*hf_clinic.load_admin"):
        apply_admin(stock, omega="closed_form")
    with pytest.raises(ValueError, match="stock `from_pretrained`.*hf_clinic.load_admin"):
        export_vanilla(stock)

    # The hf_clinic loader restores the exact model.
    loaded = load_admin(tmp_path).eval()
    assert type(loaded) is MarianMTModel
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert {n: p.requires_grad for n, p in omegas(loaded).items()} == {n: True for n in omegas(model)}
    with pytest.raises(ValueError, match="not an Admin checkpoint"):
        export_vanilla(model).save_pretrained(tmp_path / "stock") or load_admin(tmp_path / "stock")
