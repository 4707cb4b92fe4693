#!/usr/bin/env python
# ######################################################################################################################
# hf-clinic recipe: fine-tune any sequence-classification checkpoint on any GLUE task.
#
# This is a complete `transformers.Trainer` script (the shape of transformers' `run_glue.py`) that shows every
# hf-clinic part working together on a real task:
#   - optimizers by name:   --optim radam | lamb | lars | gsignsgd | lamb_nvlamb | ...   (registered by `import hf_clinic`)
#   - Admin:                --admin    (AdminCallback: trainable residual weights ω, exported exactly to stock weights)
#   - clipping policies:    --clip_policy fixed | step_length | percentile | zscore | unitwise   (ClipAwareCallback)
#   - a model card that says how the model was trained, and --push_to_hub of the stock export plus that card.
# Tasks: cola, sst2, mrpc, stsb, qqp, mnli (matched + mismatched), qnli, rte, wnli, with the official GLUE metrics.
# Data: the Hub (`nyu-mll/glue`) by default; `--data_dir` reads the classic `glue_data/` TSV layout offline.
#
# It runs unchanged as a plain script or under `accelerate launch`, on CPU or GPU:
#   python recipes/glue.py --model_name_or_path bert-base-uncased --task_name sst2 --do_train --do_eval \
#       --optim radam --output_dir runs/sst2
#   accelerate launch --multi_gpu --num_processes 2 recipes/glue.py --use_cpu ...      # 2 CPU processes (gloo)
# Resume with --resume_from_checkpoint runs/sst2/checkpoint-500 (or `last`).
#
# Lines specific to hf-clinic are marked `# hf-clinic`; everything else is stock transformers.
# ######################################################################################################################

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from recipe_utils import (  # hf-clinic
    ClinicArguments,
    clinic_callbacks,
    load_model_config,
    resolve_checkpoint,
    take_push_to_hub,
)
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_clinic  # noqa: F401  hf-clinic: registers --optim radam|lamb|lars|gsignsgd|... (and clip-aware schedule names)
from hf_clinic.cards import MetricResult, command_line  # hf-clinic
from hf_clinic.hub import publish_from_trainer  # hf-clinic


logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is read (Hub columns and `glue_data/` TSV layout) and scored."""

    folder: str  # glue_data/<folder>
    text_columns: tuple  # Hub column names of the one or two input texts
    labels: tuple | None  # class names in Hub order; None for regression
    metrics: tuple  # official metrics (`evaluate` ids)
    tsv_columns: dict  # Hub column -> TSV header name (or column index when the file has no header)
    has_header: bool = True
    test_tsv_columns: dict | None = None  # when the (always headed) test file names its columns differently
    eval_splits: tuple = ("validation",)
    test_splits: tuple = ("test",)


# fmt: off
GLUE_TASKS = {
    "cola": GlueTask(
        "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
        {"sentence": 3, "label": 1}, has_header=False, test_tsv_columns={"sentence": "sentence"},
    ),
    "sst2": GlueTask("SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), {"sentence": "sentence", "label": "label"}),
    "mrpc": GlueTask(
        "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
        {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
    ),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"),
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
    ),
    "qqp": GlueTask(
        "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
        {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
    ),
    "mnli": GlueTask(
        "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
        {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
        eval_splits=("validation_matched", "validation_mismatched"), test_splits=("test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask(
        "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
        {"question": "question", "sentence": "sentence", "label": "label"},
    ),
    "rte": GlueTask(
        "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    ),
    "wnli": GlueTask(
        "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    ),
}
# fmt: on

# glue_data/ file name of each split
TSV_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A local folder or a Hub id of any sequence-classification checkpoint."}
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id recorded as `base_model` in the model card when --model_name_or_path is a local folder."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a checkpoint's classification head whose label count differs from the task's."},
    )
    license: str | None = field(default=None, metadata={"help": "License of the published weights (model card)."})


@dataclass
class DataArguments:
    task_name: str = field(metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A `glue_data/` folder (e.g. ../shared/data/glue) with <Task>/train.tsv, dev.tsv. "
            "Default: the Hub dataset nyu-mll/glue."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of each eval split."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})

    def __post_init__(self):
        self.task_name = self.task_name.lower()
        if self.task_name not in GLUE_TASKS:
            raise ValueError(f"Unknown GLUE task {self.task_name!r}; valid tasks: {', '.join(GLUE_TASKS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_glue(task_name: str, data_dir: str | None = None, cache_dir: str | None = None) -> DatasetDict:
    """Load a GLUE task as a `DatasetDict` with the Hub's splits, columns and label ids.

    From the Hub (`nyu-mll/glue`) by default; from the classic `glue_data/` TSV layout when `data_dir` is given
    (read with quoting disabled and every string kept as text, e.g. "null"; MRPC's byte-order mark is stripped;
    CoLA's header-less files are read by position). Splits whose file is missing are left out, except train and
    the evaluation splits, which must exist.
    """
    task = GLUE_TASKS[task_name]
    if data_dir is None:
        try:
            return datasets.load_dataset(HUB_DATASET, task_name, cache_dir=cache_dir)
        except Exception as err:
            raise RuntimeError(
                f"Could not load GLUE task {task_name!r} from the Hub ({HUB_DATASET}): {err}\n"
                "Offline? Pass --data_dir with the glue_data/ TSV layout, e.g. --data_dir ../shared/data/glue"
            ) from err

    folder = Path(data_dir)
    if folder.name != task.folder and (folder / task.folder).is_dir():
        folder = folder / task.folder
    elif folder.name != task.folder and not (folder / TSV_FILES["train"]).is_file():
        raise FileNotFoundError(
            f"GLUE data for {task_name!r} not found: expected the folder {str(Path(data_dir) / task.folder)!r} "
            f"(glue_data/ layout: <data_dir>/{task.folder}/train.tsv, dev.tsv)"
        )
    splits = {}
    for split in ("train", *task.eval_splits, *task.test_splits):
        path = folder / TSV_FILES[split]
        if not path.is_file():
            if split in task.test_splits:
                continue
            raise FileNotFoundError(f"GLUE {task_name!r} split {split!r} not found: {str(path)!r} does not exist")
        splits[split] = read_glue_tsv(path, task, labelled=split not in task.test_splits)
    return DatasetDict(splits)


def read_glue_tsv(path: Path, task: GlueTask, labelled: bool = True) -> Dataset:
    """Read one `glue_data/` TSV file into a `Dataset` with the Hub's columns (`idx`, texts, `label`)."""
    if labelled:
        columns = dict(task.tsv_columns)
    else:  # GLUE test files carry no label, and always a header
        columns = {k: v for k, v in (task.test_tsv_columns or task.tsv_columns).items() if k != "label"}
    has_header = task.has_header or not labelled
    rows, skipped = {k: [] for k in columns}, []
    # utf-8-sig strips MRPC's byte-order mark; quoting is disabled because the texts hold unbalanced quotes
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if has_header:
            header = [h.strip() for h in next(reader)]
            missing = [name for name in columns.values() if name not in header]
            if missing:
                raise ValueError(f"{str(path)!r}: header {header} lacks the column(s) {missing} for {task.folder}")
            positions = {k: header.index(v) for k, v in columns.items()}
        else:
            positions = dict(columns)
        for line_no, row in enumerate(reader, start=2 if has_header else 1):
            if not row:
                continue
            if len(row) <= max(positions.values()):
                skipped.append(line_no)
                continue
            for key, pos in positions.items():
                rows[key].append(row[pos])
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) (too few fields), lines %s", path, len(skipped), skipped[:10])
    features = {"idx": Value("int32")}
    for key in task.text_columns:
        features[key] = Value("string")
    if labelled:
        features["label"] = Value("float32") if task.labels is None else ClassLabel(names=list(task.labels))
        rows["label"] = [_parse_label(v, task, path) for v in rows["label"]]
    rows["idx"] = list(range(len(rows[task.text_columns[0]])))
    return Dataset.from_dict({k: rows[k] for k in features}, features=Features(features))


def _parse_label(value: str, task: GlueTask, path: Path):
    value = value.strip()
    if task.labels is None:
        return float(value)
    if value in task.labels:
        return task.labels.index(value)
    if value.isdigit() and int(value) < len(task.labels):
        return int(value)
    raise ValueError(f"{str(path)!r}: label {value!r} is not one of {list(task.labels)} (or their ids)")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (the official GLUE ones)
# ----------------------------------------------------------------------------------------------------------------------


def glue_metrics(task_name: str, predictions, references) -> dict[str, float]:
    """The official GLUE metrics of `task_name` for class ids (or scores, for stsb): the same numbers and keys as
    `evaluate.load("glue", task_name)`, computed with scikit-learn / scipy so that no download is needed."""
    task = GLUE_TASKS[task_name]
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    out = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(references, predictions))
        elif metric == "f1":
            out[metric] = float(f1_score(references, predictions))
        elif metric == "matthews_correlation":
            out[metric] = float(matthews_corrcoef(references, predictions))
        elif metric == "pearson":
            out[metric] = float(pearsonr(predictions, references)[0])
        elif metric == "spearmanr":
            out[metric] = float(spearmanr(predictions, references)[0])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def load_config(model_name_or_path: str, task_name: str, ignore_mismatched_sizes: bool = False):
    """The checkpoint's config set up for `task_name`, with clear errors for a bad path or a head of the wrong size."""
    task = GLUE_TASKS[task_name]
    num_labels = 1 if task.labels is None else len(task.labels)
    config = load_model_config(model_name_or_path)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != num_labels and not ignore_mismatched_sizes:
        raise ValueError(
            f"{model_name_or_path!r} has a classification head with {config.num_labels} labels "
            f"({list(config.id2label.values())}), but GLUE {task_name} has {num_labels} "
            f"({list(task.labels) if task.labels else 'regression'}); pass --ignore_mismatched_sizes to replace it"
        )
    labels = task.labels or ("score",)
    return load_model_config(
        model_name_or_path,
        num_labels=num_labels,
        finetuning_task=task_name,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if task.labels is None else "single_label_classification",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, ClinicArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None) -> dict:
    model_args, data_args, clinic, training_args = parse_args(argv)
    # hf-clinic: the command for the model card (secrets redacted), also when main() is called from Python
    command = command_line([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    push_to_hub = take_push_to_hub(training_args)  # hf-clinic: we publish the stock export + card after training

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Process rank: {training_args.process_index}, world size: {training_args.world_size}, "
        f"device: {training_args.device}, optimizer: {training_args.optim}"
    )

    checkpoint = resolve_checkpoint(training_args)  # a folder, `last`, or None
    set_seed(training_args.seed)
    task = GLUE_TASKS[data_args.task_name]
    raw = load_glue(data_args.task_name, data_args.data_dir)
    config = load_config(model_args.model_name_or_path, data_args.task_name, model_args.ignore_mismatched_sizes)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
    )

    def preprocess(examples):
        texts = [examples[c] for c in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    def select(split, limit):
        ds = raw[split]
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    with training_args.main_process_first(desc="tokenization"):
        train_dataset = select("train", data_args.max_train_samples).map(preprocess, batched=True)
        eval_datasets = {
            s: select(s, data_args.max_eval_samples).map(preprocess, batched=True) for s in task.eval_splits
        }
        test_datasets = {
            s: select(s, data_args.max_predict_samples).map(preprocess, batched=True)
            for s in task.test_splits
            if s in raw
        }

    def compute_metrics(p: EvalPrediction):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(logits) if task.labels is None else np.argmax(logits, axis=1)
        return glue_metrics(data_args.task_name, preds, p.label_ids)

    callbacks, admin_cb, clip_cb = clinic_callbacks(clinic)  # hf-clinic
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_datasets[task.eval_splits[0]],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None
        ),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )

    all_metrics = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in metrics.items()})

    results = []
    if training_args.do_eval:
        eval_metrics = {}
        for i, split in enumerate(task.eval_splits):
            prefix = "eval" if i == 0 else f"eval_{split.split('_')[-1]}"  # mnli: eval (matched), eval_mismatched
            metrics = trainer.evaluate(eval_dataset=eval_datasets[split], metric_key_prefix=prefix)
            metrics[f"{prefix}_samples"] = len(eval_datasets[split])
            eval_metrics.update(metrics)
            results += [MetricResult(m, metrics[f"{prefix}_{m}"], split=split) for m in task.metrics]
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        all_metrics.update(eval_metrics)

    if training_args.do_predict:
        for split, ds in test_datasets.items():
            logits = trainer.predict(ds.remove_columns([c for c in ("label",) if c in ds.column_names])).predictions
            preds = np.squeeze(logits) if task.labels is None else np.argmax(logits, axis=1)
            if trainer.is_world_process_zero():
                path = Path(training_args.output_dir) / f"predict_results_{data_args.task_name}_{split}.txt"
                with open(path, "w", encoding="utf-8") as f:
                    f.write("index\tprediction\n")
                    for i, p in enumerate(preds):
                        f.write(f"{i}\t{p:.3f}\n" if task.labels is None else f"{i}\t{task.labels[p]}\n")

    if training_args.do_train:
        if admin_cb is not None:  # hf-clinic: keep the Admin model (with ω) for further training; never published
            trainer.save_model(os.path.join(training_args.output_dir, "admin_checkpoint"))
        if trainer.is_world_process_zero():
            publish(
                trainer, model_args, data_args, results, eval_datasets[task.eval_splits[0]],
                admin_cb=admin_cb, clip_cb=clip_cb, push_to_hub=push_to_hub, command=command,
            )  # fmt: skip
        trainer.accelerator.wait_for_everyone()
    return all_metrics


def publish(trainer, model_args, data_args, results, eval_ds, *, admin_cb, clip_cb, push_to_hub, command):  # hf-clinic
    """Export a stock checkpoint + tokenizer + model card into output_dir, verify it, and push it if asked."""
    sample = eval_ds.select(range(min(16, len(eval_ds))))
    columns = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample.column_names]
    batch = trainer.data_collator([{k: sample[i][k] for k in columns} for i in range(len(sample))])
    base = model_args.base_model_id or (
        None if os.path.isdir(model_args.model_name_or_path) else model_args.model_name_or_path
    )
    publish_from_trainer(
        trainer,
        verify_batch=batch,
        push_to_hub=push_to_hub,
        task_type="text-classification",
        dataset_id=HUB_DATASET,
        dataset_name=f"GLUE {GLUE_TASKS[data_args.task_name].folder}",
        dataset_config=data_args.task_name,
        dataset_note=_data_note(data_args),
        results=results,
        base_model=base,
        language=["en"],
        license=model_args.license,
        clip=clip_cb,
        admin_report=getattr(admin_cb, "report", None),
        hyperparameters={"max_seq_length": data_args.max_seq_length},
        command=command,
    )


def _data_note(data_args) -> str:
    source = (
        f"Read from local GLUE TSV files ({data_args.data_dir})"
        if data_args.data_dir
        else f"Loaded from the Hub ({HUB_DATASET})"
    )
    n = data_args.max_train_samples
    return source + (f", first {n} training rows only." if n else ".")


if __name__ == "__main__":
    main()
