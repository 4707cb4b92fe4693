"""Publishing to the Hub through the real `huggingface_hub` upload code, with the network cut at the HTTP transport.

`FakeHub` answers the Hub's HTTP API inside an `httpx2.MockTransport` (no socket is ever opened): repo creation,
YAML validation, pre-upload (LFS for weights, inline for the rest), the LFS batch API plus the storage PUT, and the
commit. It decodes what a real Hub would store, so the tests check the files and the card a real Hub would receive.
`is_xet_available` is patched to False where `upload_folder` (`hf_api`) and the LFS upload (`_commit_api`) read it,
and `constants.HF_HUB_DISABLE_XET` is set: with `hf_xet` installed, weights would otherwise go through hf_xet's own
Rust HTTP client, which bypasses the httpx2 transport and would reach for the real network.
"""

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from unittest import mock

import httpx2
import huggingface_hub
import huggingface_hub._commit_api
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http
from safetensors.torch import save_file
from tiny_models import classification_batch, seq2seq_batch, tiny_bert, tiny_marian

from hf_clinic.cards import MetricResult, TrainingRecord, model_card_data, render_model_card
from hf_clinic.hub import check_stock_folder, push_folder_to_hub, save_for_hub, verify_stock_export


class FakeHub:
    """The Hub's upload API, enough for `HfApi.create_repo` + `HfApi.upload_folder` (regular and LFS files)."""

    LFS_SUFFIXES = (".safetensors", ".bin", ".pt")

    def __init__(self):
        self.requests = []  # (method, path, headers)
        self.repos = []  # create_repo payloads
        self.validated = []  # README contents sent to /api/validate-yaml
        self.lfs_store = {}  # sha256 hex -> bytes (what the storage PUT received)
        self.commits = []  # {"repo", "revision", "header", "files": {path: bytes}}

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, dict(request.headers)))
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            self.repos.append(body)
            repo = f"{body.get('organization') or 'someuser'}/{body['name']}"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo})
        if request.method == "GET" and path == "/api/whoami-v2":
            return httpx2.Response(200, json={"name": "someuser", "type": "user", "orgs": []})
        if request.method == "POST" and path == "/api/validate-yaml":
            self.validated.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(self.LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return httpx2.Response(200, json={"files": modes})
        if request.method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"https://huggingface.co/fake-lfs-storage/{o['oid']}"}},
                }
                for o in objects
            ]
            return httpx2.Response(200, json={"objects": actions, "transfer": "basic"})
        if request.method == "PUT" and path.startswith("/fake-lfs-storage/"):
            oid, data = path.rsplit("/", 1)[-1], request.read()
            if hashlib.sha256(data).hexdigest() != oid:  # what a real LFS store checks
                return httpx2.Response(400, json={"error": "sha256 mismatch"})
            self.lfs_store[oid] = data
            return httpx2.Response(200)
        if request.method == "POST" and "/commit/" in path:
            repo, revision = path[len("/api/models/") :].split("/commit/")
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            commit = {"repo": repo, "revision": revision, "header": lines[0]["value"], "files": {}}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    commit["files"][value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs_store:
                        return httpx2.Response(422, json={"error": f"LFS object {value['oid']} was never uploaded"})
                    commit["files"][value["path"]] = self.lfs_store[value["oid"]]
                else:
                    return httpx2.Response(400, json={"error": f"unexpected operation {line['key']}"})
            self.commits.append(commit)
            return httpx2.Response(
                200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
            )
        return httpx2.Response(404, json={"error": f"FakeHub does not serve {request.method} {path}"})


@contextlib.contextmanager
def fake_hub():
    """Route every `huggingface_hub` request to a new `FakeHub`; restore the real client afterwards."""
    hub = FakeHub()
    previous = _http._GLOBAL_CLIENT_FACTORY
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handler)))
    try:
        with (
            mock.patch.object(huggingface_hub.hf_api, "is_xet_available", return_value=False),
            mock.patch.object(huggingface_hub._commit_api, "is_xet_available", return_value=False),
            mock.patch.object(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True),
        ):
            yield hub
    finally:
        _http.set_client_factory(previous)


def _record(**overrides):
    fields = dict(
        model_name="someuser/tiny-bert-sst2",
        task_type="text-classification",
        dataset_id="nyu-mll/glue",
        dataset_name="GLUE SST-2",
        dataset_config="sst2",
        results=[MetricResult("accuracy", 0.875)],
        architecture="BertForSequenceClassification",
        optimizer={
            "name": "radam",
            "family": "radam",
            "learning_rate": 1e-4,
            "weight_decay": 0.0,
            "lr_scheduler_type": "linear",
            "warmup_steps": 0,
        },
        command="python recipes/glue.py --optim radam",
        license="apache-2.0",
    )
    fields.update(overrides)
    return TrainingRecord(**fields)


@pytest.fixture
def export_folder(tmp_path):
    model = tiny_bert().eval()
    folder = tmp_path / "export"
    save_for_hub(model, folder, card=render_model_card(_record()))
    # Things a training output folder also holds, which must never be uploaded.
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.875}))
    return model, folder


def test_push_uploads_the_stock_export_and_its_card(export_folder):
    model, folder = export_folder
    with fake_hub() as hub:
        commit = push_folder_to_hub(folder, "someuser/tiny-bert-sst2", token="hf_fake_token", private=True)

    assert commit.oid == "a" * 40
    [repo] = hub.repos
    assert (repo["name"], repo["organization"], repo["visibility"]) == ("tiny-bert-sst2", "someuser", "private")
    assert all(h.get("authorization") == "Bearer hf_fake_token" for m, p, h in hub.requests if m == "POST")
    [commit] = hub.commits
    assert commit["repo"] == "someuser/tiny-bert-sst2" and commit["revision"] == "main"
    files = commit["files"]
    assert set(files) == {"README.md", "config.json", "model.safetensors", "all_results.json"}
    for name, data in files.items():  # byte-identical to the local export (weights via LFS, sha256-checked)
        assert data == (folder / name).read_bytes(), name
    assert hashlib.sha256(files["model.safetensors"]).hexdigest() in hub.lfs_store

    # The card the Hub received: validated, and its metadata is exactly what the record says.
    card = ModelCard(files["README.md"].decode())
    assert hub.validated and ModelCard(hub.validated[-1]).data.to_dict() == card.data.to_dict()
    assert card.data.to_dict() == model_card_data(_record()).to_dict()
    assert card.data.library_name == "transformers" and "hf-clinic" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.875


def test_pushed_weights_load_in_stock_transformers_without_hf_clinic(export_folder, tmp_path):
    model, folder = export_folder
    with fake_hub() as hub:
        push_folder_to_hub(folder, "someuser/tiny-bert-sst2", token="hf_fake_token")
    received = tmp_path / "received"
    received.mkdir()
    for name, data in hub.commits[0]["files"].items():
        (received / name).write_bytes(data)
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(received)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        f"torch.save(out, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k.startswith('hf_clinic') for k in sys.modules), 'hf_clinic was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_save_for_hub_folds_admin_into_a_stock_checkpoint(tmp_path):
    from transformers import BertForSequenceClassification

    from hf_clinic.admin import apply_admin

    model = tiny_bert().eval()
    apply_admin(model, omega="closed_form")  # ω ≈ 1.9 on every sublayer: outputs differ from the vanilla model
    folder = save_for_hub(model, tmp_path / "stock", card=render_model_card(_record()))
    check_stock_folder(folder)
    stock = BertForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.randint(2, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_push_refuses_a_folder_with_admin_state(tmp_path):
    folder = tmp_path / "admin"
    tiny_bert().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    state = {"bert.encoder.layer.0.attention.output.LayerNorm.admin_omega": torch.ones(32)}
    save_file(state, str(folder / "model.safetensors"))
    with fake_hub() as hub, pytest.raises(ValueError, match="admin_omega"):
        push_folder_to_hub(folder, "someuser/x", token="hf_fake_token")
    assert hub.requests == []  # refused before any request

    marked = tmp_path / "marked"
    tiny_bert().save_pretrained(marked)
    config = json.loads((marked / "config.json").read_text())
    config["admin"] = {"format": 1}
    (marked / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="admin"):
        check_stock_folder(marked)


def test_push_refuses_a_folder_without_card_or_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_folder_to_hub(tmp_path, "someuser/x", token="hf_fake_token")
    tiny_bert().save_pretrained(tmp_path)
    with fake_hub() as hub, pytest.raises(FileNotFoundError, match="README.md"):
        push_folder_to_hub(tmp_path, "someuser/x", token="hf_fake_token")
    assert hub.requests == []


def test_verify_stock_export_compares_the_reloaded_checkpoint(tmp_path):
    from hf_clinic.admin import apply_admin

    bert = tiny_bert().eval()
    apply_admin(bert, omega="closed_form")
    save_for_hub(bert, tmp_path / "bert")
    check = verify_stock_export(bert, tmp_path / "bert", classification_batch(batch_size=3))
    assert check.startswith("reloaded with stock `BertForSequenceClassification`, max |Δlogits| = ")
    assert check.endswith(" on 3 examples") and "greedy" not in check

    marian = tiny_marian().eval()
    apply_admin(marian, omega="closed_form")
    save_for_hub(marian, tmp_path / "marian")
    check = verify_stock_export(marian, tmp_path / "marian", seq2seq_batch(batch_size=2))
    assert "stock `MarianMTModel`" in check and "identical greedy generations on 2 examples" in check
    assert marian.training is False  # the model's mode is kept

    with torch.no_grad():  # the trained model moves on after the export: the check must notice
        bert.classifier.bias += 0.01
    with pytest.raises(RuntimeError, match=r"differs from the trained model: max \|Δlogits\| = 0.01"):
        verify_stock_export(bert, tmp_path / "bert", classification_batch(batch_size=3))
