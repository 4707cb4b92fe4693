"""Export to a stock checkpoint, checked by stock transformers in a process that never imports hf_clinic.

BERT (tiny and the real all-MiniLM-L6-v2 checkpoint), Marian and T5 are Admin-trained for a few steps (so ω has moved
away from its initial value), exported with `save_vanilla`, and reloaded with plain `AutoModel*.from_pretrained` in a
subprocess. Acceptance: max relative error of the final outputs <= 1e-5 in float32, identical greedy generations.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import classification_batch, seq2seq_batch, tiny_bert, tiny_marian, tiny_t5
from transformers import BertModel

from hf_clinic.admin import apply_admin, save_vanilla


HERE = os.path.dirname(os.path.abspath(__file__))
GENERATE = dict(max_new_tokens=8, do_sample=False, num_beams=1)


def omegas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("admin_omega")}


def train_a_few_steps(model, batch, loss_fn=None, steps=3):
    initial = {n: p.detach().clone() for n, p in omegas(model).items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(**batch)
        loss = loss_fn(out) if loss_fn else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    moved = [n for n, p in omegas(model).items() if not torch.allclose(p, initial[n])]
    assert moved and len(moved) == len(initial), "ω must have moved away from its initial value"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("admin_export")
    manifest = {}

    def export(name, model, inputs, auto_class, outputs, generate=False):
        path = str(root / name)
        with torch.no_grad():
            out = model(**inputs)
            saved = {"inputs": inputs, **{k: getattr(out, k) for k in outputs}}
            if generate:
                saved["generated"] = model.generate(inputs["input_ids"], **GENERATE)
        save_vanilla(model, path)
        torch.save(saved, os.path.join(path, "expected.pt"))
        manifest[name] = {
            "path": path,
            "auto_class": auto_class,
            "outputs": outputs,
            "generate": generate,
            "generate_kwargs": GENERATE,
        }

    torch.manual_seed(0)
    bert = tiny_bert()
    batch = classification_batch()
    apply_admin(bert, [batch])
    train_a_few_steps(bert, batch)
    export(
        "bert",
        bert,
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        "AutoModelForSequenceClassification",
        ["logits"],
    )

    minilm = BertModel.from_pretrained(minilm_path)
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding, so the attention mask path is exercised too
    apply_admin(minilm, [{"input_ids": ids, "attention_mask": mask}])
    train_a_few_steps(
        minilm,
        {"input_ids": ids, "attention_mask": mask},
        loss_fn=lambda out: (out.pooler_output - 0.5).pow(2).mean() + out.last_hidden_state.var(),
    )
    export(
        "minilm",
        minilm,
        {"input_ids": ids, "attention_mask": mask},
        "AutoModel",
        ["last_hidden_state", "pooler_output"],
    )

    for name, build in (("marian", tiny_marian), ("t5", tiny_t5)):
        model = build()
        batch = seq2seq_batch()
        apply_admin(model, [batch])
        train_a_few_steps(model, batch)
        export(
            name,
            model,
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]},
            "AutoModelForSeq2SeqLM",
            ["logits"],
            generate=True,
        )

    manifest_path = root / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "scripts", "admin_stock_load.py"), str(manifest_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(root),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    print("stock reload:", json.dumps(results))  # visible with `pytest -s`
    return results, root


def test_stock_transformers_never_imported_hf_clinic(exported):
    results, root = exported
    assert results.pop("hf_clinic_imported") is False
    for name, entry in results.items():
        assert not entry["has_admin_config"] and entry["omega_params"] == [], name
        config = json.loads((root / name / "config.json").read_text())
        assert "admin" not in config


@pytest.mark.parametrize("name", ["bert", "minilm", "marian", "t5"])
def test_stock_outputs_equal_admin_outputs(exported, name):
    results, _ = exported
    entry = results[name]
    assert all(err <= 1e-5 for err in entry["max_rel_error"].values()), entry
    if name in ("marian", "t5"):
        assert entry["same_generation"] is True
