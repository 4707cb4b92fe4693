"""The GLUE recipe (`recipes/glue.py`): data layouts, official metrics, every hf-clinic optimizer and clip policy, a
short real run, resume, a 2-process launch, bad input, and the offline demo (`recipes/demo.py`) as a plain script.

The real run fine-tunes the real MiniLM checkpoint for 4 steps on the shipped SST-2 sample with RAdam + Admin +
ZClip clipping and `--push_to_hub` against the in-process fake Hub of `test_hub.py`; its accuracy is recomputed by
a separate process that loads the published stock checkpoint without hf_clinic.
"""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from launch_utils import accelerate_launch
from test_hub import fake_hub
from tiny_models import tiny_bert_config


REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "recipes" / "data" / "glue"
SHARED = REPO.parent / "shared" / "data" / "glue"


def load_recipe(name):
    # `python recipes/<name>.py` puts recipes/ first on sys.path, for the recipes' shared `recipe_utils`
    if str(REPO / "recipes") not in sys.path:
        sys.path.insert(0, str(REPO / "recipes"))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that objects defined in the recipe pickle (e.g. into checkpoints)
    spec.loader.exec_module(module)
    return module


glue = load_recipe("glue")


# ----------------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------------


def _ranks(x):
    """Average ranks (ties share the mean rank), by hand."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def test_metrics_hand_computed_case():
    # preds 1 0 1 1 vs labels 1 0 0 1: tp=2 tn=1 fp=1 fn=0
    assert glue.glue_metrics("mrpc", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    mcc = (2 * 1 - 1 * 0) / math.sqrt(3 * 2 * 2 * 1)
    assert glue.glue_metrics("cola", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"matthews_correlation": mcc})


@pytest.mark.parametrize("task", list(glue.GLUE_TASKS))
def test_metrics_match_independent_computations(task):
    rng = np.random.default_rng(0)
    n = 257
    if task == "stsb":
        labels = np.round(rng.uniform(0, 5, n), 1)  # ties on purpose
        preds = np.round(labels + rng.normal(0, 1, n), 1)
        got = glue.glue_metrics(task, preds, labels)
        assert got.keys() == {"pearson", "spearmanr"}
        assert got["pearson"] == pytest.approx(_pearson(preds, labels), abs=1e-12)
        assert got["spearmanr"] == pytest.approx(_pearson(_ranks(list(preds)), _ranks(list(labels))), abs=1e-12)
        return
    k = len(glue.GLUE_TASKS[task].labels)
    labels = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    got = glue.glue_metrics(task, preds, labels)
    expected = {"accuracy": float(np.mean(preds == labels))}
    tp = int(np.sum((preds == 1) & (labels == 1)))
    fp = int(np.sum((preds == 1) & (labels == 0)))
    fn = int(np.sum((preds == 0) & (labels == 1)))
    tn = int(np.sum((preds == 0) & (labels == 0)))
    if task in ("mrpc", "qqp"):
        expected["f1"] = 2 * tp / (2 * tp + fp + fn)
    if task == "cola":
        expected = {
            "matthews_correlation": (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        }
    assert got == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------


def _write(path, text, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))


def test_tsv_layouts(tmp_path, caplog):
    root = tmp_path / "glue_data"
    # CoLA: no header; columns source, label, original label, sentence; an unbalanced quote stays in the text.
    _write(root / "CoLA" / "train.tsv", 'gj04\t1\t\tHe said "so.\nbc01\t0\t*\tnull\n')
    _write(root / "CoLA" / "dev.tsv", "gj04\t1\t\tA cat sat.\n")
    _write(root / "CoLA" / "test.tsv", "index\tsentence\n0\tUnlabelled one.\n")
    cola = glue.load_glue("cola", str(root))
    assert cola["train"]["sentence"] == ['He said "so.', "null"] and cola["train"]["label"] == [1, 0]
    assert cola["test"]["sentence"] == ["Unlabelled one."] and "label" not in cola["test"].column_names

    # MRPC: byte-order mark before the header; the label is the Quality column.
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(root / "MRPC" / "train.tsv", header + '1\t1\t2\t"Quoted\tNA\n0\t3\t4\tx\ty\n', bom=True)
    _write(root / "MRPC" / "dev.tsv", header + "1\t5\t6\ta\tb\n", bom=True)
    mrpc = glue.load_glue("mrpc", str(root / "MRPC"))  # the task folder itself works too
    assert mrpc["train"]["sentence1"] == ['"Quoted', "x"] and mrpc["train"]["sentence2"] == ["NA", "y"]
    assert mrpc["train"].features["label"].names == ["not_equivalent", "equivalent"] and "test" not in mrpc

    # RTE: string labels map to the Hub's ids; a malformed row is skipped loudly.
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(root / "RTE" / "train.tsv", header + "0\tA\tB\tnot_entailment\n1\tC\tD\tentailment\n2\tbroken row\n")
    _write(root / "RTE" / "dev.tsv", header + "0\tE\tF\tentailment\n")
    with caplog.at_level("WARNING"):
        rte = glue.load_glue("rte", str(root))
    assert rte["train"]["label"] == [1, 0] and rte["train"]["idx"] == [0, 1]
    assert "skipped 1 malformed row" in caplog.text

    # STS-B: float scores; MNLI: matched + mismatched dev files, gold_label.
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(root / "STS-B" / "train.tsv", header + "0\tg\tf\ty\t1\ts\ts\tA\tB\t4.250\n")
    _write(root / "STS-B" / "dev.tsv", header + "0\tg\tf\ty\t1\ts\ts\tA\tB\t0.5\n")
    assert glue.load_glue("stsb", str(root))["train"]["label"] == [4.25]
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    for name, gold in (("train", "neutral"), ("dev_matched", "contradiction"), ("dev_mismatched", "entailment")):
        _write(root / "MNLI" / f"{name}.tsv", header + f"0\t1\t2\tg\tP\tH\tx\t{gold}\n")
    mnli = glue.load_glue("mnli", str(root))
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    assert (mnli["train"]["label"], mnli["validation_matched"]["label"], mnli["validation_mismatched"]["label"]) == (
        [1],
        [2],
        [0],
    )
    assert mnli["train"]["premise"] == ["P"] and mnli["train"]["hypothesis"] == ["H"]

    # QQP: id columns, 0/1 labels, an unlabelled test file; QNLI: string labels; WNLI: 0/1 with 1 = entailment.
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    _write(root / "QQP" / "train.tsv", header + "5\t1\t2\tWhy?\tHow?\t0\n6\t3\t4\tWho?\tWho is?\t1\n")
    _write(root / "QQP" / "dev.tsv", header + "7\t5\t6\tA?\tB?\t1\n")
    _write(root / "QQP" / "test.tsv", "id\tquestion1\tquestion2\n0\tC?\tD?\n")
    qqp = glue.load_glue("qqp", str(root))
    assert qqp["train"]["question2"] == ["How?", "Who is?"] and qqp["train"]["label"] == [0, 1]
    assert qqp["test"]["question1"] == ["C?"] and qqp["train"].features["label"].names[1] == "duplicate"
    header = "index\tquestion\tsentence\tlabel\n"
    _write(root / "QNLI" / "train.tsv", header + "0\tQ?\tS.\tnot_entailment\n")
    _write(root / "QNLI" / "dev.tsv", header + "0\tQ2?\tS2.\tentailment\n")
    qnli = glue.load_glue("qnli", str(root))
    assert (qnli["train"]["question"], qnli["train"]["label"], qnli["validation"]["label"]) == (["Q?"], [1], [0])
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(root / "WNLI" / "train.tsv", header + "0\tA.\tB.\t1\n1\tC.\tD.\t0\n")
    _write(root / "WNLI" / "dev.tsv", header + "0\tE.\tF.\t0\n")
    wnli = glue.load_glue("wnli", str(root))
    assert [wnli["train"].features["label"].int2str(y) for y in wnli["train"]["label"]] == [
        "entailment",
        "not_entailment",
    ]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/glue is not staged here")
def test_real_glue_data_matches_published_statistics():
    expected = {  # (train rows, dev rows, train rows with label id 1) as published (GLUE; the staged READMEs)
        "sst2": (67349, 872, 37569),
        "mrpc": (3668, 408, 2474),
        "cola": (8551, 1043, 6023),
        "rte": (2490, 277, 1241),
    }
    for task, (n_train, n_dev, n_ones) in expected.items():
        data = glue.load_glue(task, str(SHARED))
        assert (len(data["train"]), len(data["validation"])) == (n_train, n_dev), task
        assert sum(1 for y in data["train"]["label"] if y == 1) == n_ones, task
    stsb = glue.load_glue("stsb", str(SHARED))
    assert (len(stsb["train"]), len(stsb["validation"]), len(stsb["test"])) == (5749, 1500, 1379)


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------


def _args(tmp_path, model, *extra):
    return [
        "--model_name_or_path",
        str(model),
        "--task_name",
        "sst2",
        "--data_dir",
        str(SAMPLE),
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
        "--do_train",
        *extra,
    ]


def test_bad_input(tmp_path, minilm_path):
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'sst3'; valid tasks: cola, sst2, mrpc"):
        glue.parse_args(_args(tmp_path, minilm_path)[:2] + ["--task_name", "sst3", "--output_dir", str(tmp_path)])
    with pytest.raises(
        FileNotFoundError, match=r"GLUE data for 'sst2' not found: expected the folder .*/nowhere/SST-2"
    ):
        glue.main(_args(tmp_path, minilm_path, "--data_dir", str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="is not an existing folder nor a Hub id"):
        glue.main(_args(tmp_path, tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        glue.main(_args(tmp_path, tmp_path / "empty"))
    with pytest.raises(OSError, match="neither a local folder nor a reachable Hub repository"):
        glue.main(_args(tmp_path, "someuser/model-that-is-not-cached"))
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .* does not exist"):
        glue.main(_args(tmp_path, minilm_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")))
    with pytest.raises(ValueError, match="--push_to_hub publishes the model this run trains and needs --do_train"):
        glue.main(_args(tmp_path, minilm_path, "--do_train", "false", "--do_eval", "--push_to_hub"))

    # A checkpoint whose classification head has 3 labels cannot silently be used for a 2-label task.
    from transformers import BertForSequenceClassification

    three = tmp_path / "three-labels"
    BertForSequenceClassification(tiny_bert_config(num_labels=3)).save_pretrained(three)
    with pytest.raises(ValueError, match=r"head with 3 labels .* but GLUE sst2 has 2 .*--ignore_mismatched_sizes"):
        glue.load_config(str(three), "sst2")
    assert glue.load_config(str(three), "sst2", ignore_mismatched_sizes=True).num_labels == 2
    assert glue.load_config(str(three), "mnli").id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}

    # Offline (as in the tests), the Hub default says what to do instead.
    with pytest.raises(RuntimeError, match=r"Pass --data_dir with the glue_data/ TSV layout"):
        glue.load_glue("sst2")

    # A data file whose labels are not the task's.
    bad = tmp_path / "bad" / "RTE"
    _write(bad / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    _write(bad / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"label 'neutral' is not one of \['entailment', 'not_entailment'\]"):
        glue.load_glue("rte", str(bad.parent))


def _synthetic_task(root, folder, header, rows_by_file):
    for name, rows in rows_by_file.items():
        _write(root / folder / name, header + "".join("\t".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, minilm_path):
    """A 2-layer BERT (random weights) with the MiniLM tokenizer: fast runs of the other task types."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("tiny") / "bert"
    BertModel(tiny_bert_config(vocab_size=30522, max_position_embeddings=128)).save_pretrained(path)  # no head
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


def test_regression_and_mnli_runs(tmp_path, tiny_checkpoint):
    words = ["a cat sat", "the dog ran", "two men talk", "a woman sings", "kids play outside", "a car stops"]
    stsb_header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [
        (i, "g", "f", "y", i, "s", "s", words[i % 6], words[(i * 5) % 6], f"{(i * 7) % 6 * 0.8:.2f}")
        for i in range(24)
    ]
    _synthetic_task(tmp_path, "STS-B", stsb_header, {"train.tsv": rows, "dev.tsv": rows[:12]})
    mnli_header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    gold = ("entailment", "neutral", "contradiction")
    rows = [(i, i, i, "g", words[i % 6], words[(i + 1) % 6], "x", gold[i % 3]) for i in range(24)]
    _synthetic_task(
        tmp_path,
        "MNLI",
        mnli_header,
        {"train.tsv": rows, "dev_matched.tsv": rows[:9], "dev_mismatched.tsv": rows[9:21]},
    )
    common = "--do_train --do_eval --max_steps 2 --per_device_train_batch_size 8 --report_to none --save_strategy no"
    for task in ("stsb", "mnli"):
        out = tmp_path / f"out-{task}"
        metrics = glue.main(
            ["--model_name_or_path", str(tiny_checkpoint), "--task_name", task, "--data_dir", str(tmp_path),
             "--output_dir", str(out), "--optim", "lamb", *common.split()]
        )  # fmt: skip
        card = ModelCard((out / "README.md").read_text())
        got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
        if task == "stsb":
            assert set(got) == {("validation", "pearson"), ("validation", "spearmanr")}
            assert got[("validation", "pearson")] == pytest.approx(metrics["eval_pearson"], abs=1e-6)
            assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"
        else:
            assert metrics["eval_samples"] == 9 and metrics["eval_mismatched_samples"] == 12
            assert got == pytest.approx(
                {("validation_matched", "accuracy"): metrics["eval_accuracy"],
                 ("validation_mismatched", "accuracy"): metrics["eval_mismatched_accuracy"]}, abs=1e-6
            )  # fmt: skip
        assert card.data.hf_clinic["optimizer"] == "lamb"


def test_every_hf_clinic_optimizer_and_clip_policy_is_accepted(tmp_path, minilm_path):
    import torch
    from tiny_models import classification_batch, tiny_bert
    from transformers import Trainer

    import hf_clinic
    from hf_clinic.clipping import ClipAwareCallback, list_clip_policies

    # Every hf-clinic name goes through the recipe's own parser into the optimizer the Trainer builds, which steps.
    # (What each optimizer computes is tested in test_optim_*.py.)
    for name in hf_clinic.list_optimizers():
        *_, training_args = glue.parse_args(_args(tmp_path, minilm_path, "--optim", name, "--weight_decay", "0.01"))
        assert getattr(training_args.optim, "value", training_args.optim) == name
        model = tiny_bert()
        optimizer = Trainer(model=model, args=training_args).create_optimizer()
        assert isinstance(optimizer, hf_clinic.get_optimizer_info(name).optimizer_class), name
        model(**classification_batch()).loss.backward()
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
    for policy in list_clip_policies():
        settings = "gamma=0.5" if policy == "step_length" else None
        clinic = glue.ClinicArguments(clip_policy=policy, clip_args=settings)
        [callback], admin_cb, clip_cb = glue.clinic_callbacks(clinic)
        assert isinstance(callback, ClipAwareCallback) and clip_cb.schedule.policy.name == policy and admin_cb is None
    # --clip_args reaches the policy through the shared parser, and a repeated key is refused by name
    [_], _, clip_cb = glue.clinic_callbacks(glue.ClinicArguments(clip_policy="zscore", clip_args="z_thresh=3.5"))
    assert clip_cb.schedule.policy.z_thresh == 3.5
    with pytest.raises(ValueError, match="--clip_args: 'z_thresh' is given twice"):
        glue.clinic_callbacks(glue.ClinicArguments(clip_policy="zscore", clip_args="z_thresh=2.5,z_thresh=3"))


# ----------------------------------------------------------------------------------------------------------------------
# a short real run: MiniLM, shipped SST-2 sample, RAdam + Admin + ZClip, pushed to the fake Hub
# ----------------------------------------------------------------------------------------------------------------------

N_EVAL = 48


def _run_args(minilm_path, out, *extra):
    # fmt: off
    return [
        "--model_name_or_path", minilm_path, "--base_model_id", "sentence-transformers/all-MiniLM-L6-v2",
        "--task_name", "sst2", "--data_dir", str(SAMPLE), "--do_train", "--do_eval",
        "--optim", "radam", "--learning_rate", "1e-4", "--admin", "--clip_policy", "zscore",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--max_seq_length", "64", "--max_eval_samples", str(N_EVAL), "--logging_steps", "1", "--save_steps", "2",
        "--report_to", "none", "--seed", "3", "--output_dir", str(out), "--disable_tqdm", "true", *extra,
    ]
    # fmt: on


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, minilm_path):
    out = tmp_path_factory.mktemp("glue") / "minilm-sst2"
    with fake_hub() as hub:
        push = "--push_to_hub --hub_model_id someuser/minilm-sst2 --hub_token hf_fake_token"
        metrics = glue.main(_run_args(minilm_path, out, *push.split()))
    return metrics, out, hub


def test_run_writes_metrics_json(glue_run):
    metrics, out, _ = glue_run
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_samples"] == N_EVAL and 0.0 <= saved["eval_accuracy"] <= 1.0
    assert saved["eval_accuracy"] == metrics["eval_accuracy"] and math.isfinite(saved["train_loss"])
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == saved["eval_accuracy"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logs = [h for h in state["log_history"] if "loss" in h]
    assert all("clip/rate" in h and "admin/omega_mean" in h for h in logs)  # hf-clinic metrics in the Trainer's logs


def test_accuracy_recomputed_from_the_stock_export_without_hf_clinic(glue_run, tmp_path):
    metrics, out, _ = glue_run
    with open(SAMPLE / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : N_EVAL + 1]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
rows = json.load(open({str(tmp_path / "rows.json")!r}))
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()
with torch.no_grad():
    enc = tok([r[0] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    preds = model(**enc).logits.argmax(-1).tolist()
correct = sum(int(p == int(r[1])) for p, r in zip(preds, rows))
assert not any(m.startswith("hf_clinic") for m in sys.modules)
print(json.dumps({{"correct": correct, "n": len(rows)}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["n"] == N_EVAL
    assert counts["correct"] / counts["n"] == pytest.approx(metrics["eval_accuracy"], abs=1e-12)


def test_card_says_how_the_model_was_trained(glue_run):
    metrics, out, _ = glue_run
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.hf_clinic["optimizer"] == "radam" and card.data.hf_clinic["admin"] is True
    assert card.data.hf_clinic["clip_policy"] == "zscore" and card.data.hf_clinic["stock_export"] is True
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    [result] = card.data.eval_results
    assert (result.dataset_type, result.dataset_config, result.metric_type) == ("nyu-mll/glue", "sst2", "accuracy")
    assert result.metric_value == pytest.approx(metrics["eval_accuracy"], abs=1e-6)
    assert "hf_fake_token" not in text and "--hub_token REDACTED" in text
    assert "residual sites" in text and "Clip rate" in text and "stock `BertForSequenceClassification`" in text


def test_push_to_hub_uploaded_the_stock_export_and_card(glue_run):
    _, out, hub = glue_run
    [commit] = hub.commits
    assert commit["repo"] == "someuser/minilm-sst2"
    files = commit["files"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "all_results.json"} <= set(files)
    assert not any(n.startswith(("checkpoint-", "admin_checkpoint")) or n.endswith(".bin") for n in files)
    for name, data in files.items():
        assert data == (out / name).read_bytes(), name
    assert (out / "admin_checkpoint" / "config.json").is_file()  # the Admin model, kept locally only


def test_resume_continues_the_run(glue_run, tmp_path, minilm_path):
    _, out, _ = glue_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert _mark_checkpoint(resumed / "checkpoint-2") == 2
    glue.main(_run_args(minilm_path, resumed, "--resume_from_checkpoint", "last"))
    assert _resumed_steps(resumed) == [3, 4]  # steps 1-2 come from the checkpoint, not from a new run
    original, again = _losses(out), _losses(resumed)
    for step in (3, 4):
        assert again[step] == pytest.approx(original[step], rel=1e-5), step


def _losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _mark_checkpoint(checkpoint):
    """Tag the checkpoint's logged steps, so that the resumed run's history shows it really started from there."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    for entry in state["log_history"]:
        entry["from_checkpoint"] = True
    path.write_text(json.dumps(state))
    return state["global_step"]


def _resumed_steps(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return sorted(h["step"] for h in history if "loss" in h and not h.get("from_checkpoint"))


def test_two_process_accelerate_launch(tmp_path, minilm_path):
    # A sentence-pair task with string labels and an unlabelled test split, on 2 real CPU processes (gloo).
    out = tmp_path / "ddp"
    extra = "--task_name rte --do_predict --use_cpu --save_strategy no --max_steps 2 --max_seq_length 128"
    accelerate_launch(["recipes/glue.py", *_run_args(minilm_path, out, *extra.split())])
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_samples"] == N_EVAL and 0.0 <= saved["eval_accuracy"] <= 1.0
    predictions = (out / "predict_results_rte_test.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 1 + 50  # every test row, once
    assert {line.split("\t")[1] for line in predictions[1:]} <= {"entailment", "not_entailment"}
    card = ModelCard((out / "README.md").read_text())
    assert card.data.eval_results[0].dataset_config == "rte"
    assert "2 process(es) (`MULTI_CPU`)" in card.text and "total_train_batch_size: 16" in card.text
    assert card.text.count("accelerate launch --num_processes 2 recipes/glue.py") == 1


def test_demo_runs_as_a_plain_script(tmp_path):
    # The README's first command, shortened to 3 steps; it must set up offline mode itself.
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env["OMP_NUM_THREADS"] = "1"
    short = ["--max_steps", "3", "--max_eval_samples", "32", "--disable_tqdm", "true", "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "recipes/demo.py", *short], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "all_results.json").read_text())
    assert f"dev accuracy: {saved['eval_accuracy']:.4f}   (32 dev sentences)" in result.stdout
    assert f"model card:   {out / 'README.md'}" in result.stdout
    card = ModelCard((out / "README.md").read_text())
    assert card.data.hf_clinic["optimizer"] == "radam" and card.data.hf_clinic["admin"] is True
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
