#!/usr/bin/env python
# ######################################################################################################################
# hf-clinic recipe: machine translation with Admin + RAdam and no warmup (the Admin paper's setup).
#
# This is a complete `transformers.Seq2SeqTrainer` script (the shape of transformers' `run_translation.py`) that
#   - trains a Post-LN Marian (default) or a T5 architecture from scratch, from a config, with a Unigram
#     (sentencepiece-style) tokenizer trained on the training data, or fine-tunes a pretrained checkpoint;
#   - uses the Admin paper's defaults: Admin (AdminCallback, ω profiled on the Trainer's own batches) + RAdam
#     (`--optim radam`, registered by `import hf_clinic`), no warmup, β2 = 0.98, label smoothing 0.1;
#     `--paper_init` re-initialises the model the way the paper's from-scratch experiments did;
#   - evaluates with beam search and sacrebleu BLEU + chrF on the validation and test splits;
#   - exports a stock checkpoint (Admin's ω folded exactly) with a model card, and `--push_to_hub` publishes both.
# Data: the Hub (`bentrevett/multi30k`) by default; `--data_dir` reads local parallel files `<split>.<lang>[.gz]`
# (one sentence per line, line i of the source aligned with line i of the target), e.g. Multi30k's task1/raw.
#
# It runs unchanged as a plain script or under `accelerate launch`, on CPU or GPU:
#   python recipes/translation.py --data_dir ../shared/data/multi30k/task1/raw --do_train --do_eval --do_predict \
#       --output_dir runs/mt
#   accelerate launch --multi_gpu --num_processes 2 recipes/translation.py --use_cpu ...   # 2 CPU processes (gloo)
# Resume with --resume_from_checkpoint runs/mt/checkpoint-500 (or `last`).
#
# Lines specific to hf-clinic are marked `# hf-clinic`; everything else is stock transformers.
# ######################################################################################################################

import gzip
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import sacrebleu
import transformers
from datasets import Dataset, DatasetDict
from recipe_utils import (  # hf-clinic
    ClinicArguments,
    clinic_callbacks,
    load_model_config,
    resolve_checkpoint,
    take_push_to_hub,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    GenerationConfig,
    HfArgumentParser,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

import hf_clinic  # noqa: F401  hf-clinic: registers --optim radam|lamb|lars|gsignsgd|... (and clip-aware schedule names)
from hf_clinic.cards import MetricResult, command_line  # hf-clinic
from hf_clinic.hub import publish_from_trainer  # hf-clinic


logger = logging.getLogger(__name__)

MODEL_TYPES = ("marian", "t5")
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: pad doubles as the decoder start token (Marian, T5)
VALIDATION_NAMES = ("validation", "val", "valid", "dev")
TEST_NAMES = ("test", "test_2016_flickr")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Fine-tune this checkpoint (folder or Hub id). Default: train --model_type from scratch."},
    )
    model_type: str = field(
        default="marian", metadata={"help": f"Architecture trained from scratch: {', '.join(MODEL_TYPES)}."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this tokenizer instead of training one on the training data."}
    )
    vocab_size: int = field(default=8000, metadata={"help": "Size of the joint source/target vocabulary to train."})
    encoder_layers: int = field(default=6)
    decoder_layers: int = field(default=6)
    d_model: int = field(default=512)
    attention_heads: int = field(default=8)
    ffn_dim: int = field(default=2048)
    dropout: float = field(default=0.3)
    attention_dropout: float = field(default=0.1)
    activation_dropout: float = field(default=0.1)
    max_position_embeddings: int = field(default=256)
    paper_init: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise the from-scratch model as in the Admin paper's experiments (Xavier-uniform "
            "linears, N(0, d^-1/2) embeddings) instead of transformers' default N(0, 0.02)."
        },
    )
    base_model_id: str | None = field(default=None, metadata={"help": "Hub id recorded as `base_model` in the card."})
    license: str | None = field(default=None, metadata={"help": "License of the published weights (model card)."})

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"Unknown --model_type {self.model_type!r}; valid types: {', '.join(MODEL_TYPES)}")
        if self.d_model % self.attention_heads:
            raise ValueError(f"--d_model {self.d_model} is not divisible by --attention_heads {self.attention_heads}")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="bentrevett/multi30k", metadata={"help": "Hub dataset (used without --data_dir)."}
    )
    dataset_config_name: str | None = field(default=None)
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of parallel files <split>.<lang>[.gz], e.g. ../shared/data/multi30k/task1/raw."},
    )
    source_lang: str = field(default="en")
    target_lang: str = field(default="de")
    train_split: str = field(default="train")
    validation_split: str | None = field(default=None, metadata={"help": f"Default: the first of {VALIDATION_NAMES}."})
    test_split: str | None = field(default=None, metadata={"help": f"Default: the first of {TEST_NAMES}."})
    max_source_length: int = field(default=128)
    max_target_length: int = field(default=128)
    source_prefix: str | None = field(default=None, metadata={"help": "e.g. `translate English to German: ` for T5."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)


@dataclass
class TranslationClinicArguments(ClinicArguments):  # hf-clinic: from scratch, the Admin paper's setup
    admin: bool = field(
        default=True,
        metadata={
            "help": "Admin on the Post-LN residuals via AdminCallback (the paper's setup; --no_admin to disable)."
        },
    )
    admin_omega: str = field(
        default="profile",
        metadata={
            "help": "How ω is initialised: `profile` (on the Trainer's first batches), `closed_form` or a number."
        },
    )


# hf-clinic: the Admin paper's setup (RAdam, no warmup, β2 = 0.98, label smoothing) as this recipe's defaults. They
# are prepended to the command line, so anything given there wins (argparse keeps the last value), and the arguments
# stay a stock `Seq2SeqTrainingArguments` (a subclass would make `training_args.bin` unloadable elsewhere).
PAPER_DEFAULTS = {
    "optim": "radam",
    "learning_rate": 5e-4,
    "adam_beta2": 0.98,
    "weight_decay": 1e-4,
    "warmup_steps": 0,
    "label_smoothing_factor": 0.1,
    "predict_with_generate": True,
    "generation_num_beams": 5,
}


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_parallel_data(data_args: DataArguments) -> DatasetDict:
    """Load a parallel corpus as a `DatasetDict` with splits train / validation / test and one column per language.

    From the Hub by default (datasets with one column per language, e.g. `bentrevett/multi30k`, or a
    `translation` column of dicts, e.g. `wmt16`); from local files `<split>.<lang>` or `<split>.<lang>.gz` when
    `data_dir` is given. Lines are stripped of their newline only.
    """
    src, tgt = data_args.source_lang, data_args.target_lang
    if data_args.data_dir is None:
        try:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        except Exception as err:
            raise RuntimeError(
                f"Could not load {data_args.dataset_name!r} from the Hub: {err}\nOffline? Pass --data_dir with "
                "local parallel files, e.g. --data_dir ../shared/data/multi30k/task1/raw"
            ) from err
        out = {}
        for split, ds in raw.items():
            if "translation" in ds.column_names:
                ds = ds.map(
                    lambda b: {src: [t[src] for t in b["translation"]], tgt: [t[tgt] for t in b["translation"]]},
                    batched=True,
                    remove_columns=ds.column_names,
                )
            missing = [lang for lang in (src, tgt) if lang not in ds.column_names]
            if missing:
                raise ValueError(
                    f"{data_args.dataset_name!r} split {split!r} has no column(s) {missing}: {ds.column_names}"
                )
            out[split] = ds.select_columns([src, tgt])
        return _canonical_splits(DatasetDict(out), data_args, list(raw))

    folder = Path(data_args.data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data_dir {data_args.data_dir!r} does not exist")
    present = sorted(p.name for p in folder.iterdir())
    found = {}
    for name in sorted({re.sub(r"\.[^.]+(\.gz)?$", "", p) for p in present}):
        paths = [_find(folder, name, lang) for lang in (src, tgt)]
        if all(paths):
            found[name] = paths
    if not found:
        raise FileNotFoundError(
            f"No parallel files <split>.{src}[.gz] + <split>.{tgt}[.gz] in {data_args.data_dir!r}; it holds: {present[:20]}"
        )
    out = {}
    for name, (src_path, tgt_path) in found.items():
        sources, targets = _read_lines(src_path), _read_lines(tgt_path)
        if len(sources) != len(targets):
            raise ValueError(f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}; they must align")
        out[name] = Dataset.from_dict({src: sources, tgt: targets})
    return _canonical_splits(DatasetDict(out), data_args, list(found))


def _find(folder: Path, split: str, lang: str) -> Path | None:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _canonical_splits(raw: DatasetDict, data_args: DataArguments, available: list[str]) -> DatasetDict:
    """Rename the chosen splits to train / validation / test."""

    def pick(requested, candidates, role):
        if requested is not None:
            if requested not in raw:
                raise ValueError(f"{role} split {requested!r} not found; available splits: {available}")
            return requested
        return next((c for c in candidates if c in raw), None)

    chosen = {
        "train": pick(data_args.train_split, (), "train"),
        "validation": pick(data_args.validation_split, VALIDATION_NAMES, "validation"),
        "test": pick(data_args.test_split, TEST_NAMES, "test"),
    }
    return DatasetDict({role: raw[name] for role, name in chosen.items() if name is not None})


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A joint source/target Unigram tokenizer (sentencepiece-style: NFKC, `▁` word boundaries, exact decoding)
    trained on `texts`, with `<pad>`=0, `</s>`=1 (appended to every sequence), `<unk>`=2."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>")
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length
    )


def build_model(model_args: ModelArguments, tokenizer, max_target_length: int, num_beams: int):
    """A Marian/T5 model from a config sized by the arguments (or the pretrained checkpoint)."""
    if model_args.model_name_or_path is not None:
        load_model_config(model_args.model_name_or_path)  # clear errors for a bad path
        return AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if model_args.model_type == "marian":
        config = MarianConfig(
            vocab_size=len(tokenizer),
            decoder_vocab_size=len(tokenizer),
            d_model=model_args.d_model,
            encoder_layers=model_args.encoder_layers,
            decoder_layers=model_args.decoder_layers,
            encoder_attention_heads=model_args.attention_heads,
            decoder_attention_heads=model_args.attention_heads,
            encoder_ffn_dim=model_args.ffn_dim,
            decoder_ffn_dim=model_args.ffn_dim,
            activation_function="relu",
            dropout=model_args.dropout,
            attention_dropout=model_args.attention_dropout,
            activation_dropout=model_args.activation_dropout,
            max_position_embeddings=model_args.max_position_embeddings,
            scale_embedding=True,
            share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True,
            **ids,
        )
        model = MarianMTModel(config)
    else:
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=model_args.d_model,
            d_kv=model_args.d_model // model_args.attention_heads,
            d_ff=model_args.ffn_dim,
            num_layers=model_args.encoder_layers,
            num_decoder_layers=model_args.decoder_layers,
            num_heads=model_args.attention_heads,
            dropout_rate=model_args.dropout,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            **ids,
        )
        model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(max_length=max_target_length, num_beams=num_beams, **ids)
    if model_args.paper_init:  # hf-clinic: the Admin paper's from-scratch initialisation
        from hf_clinic.admin import paper_init

        paper_init(model)
    return model


def translation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization, exp smoothing; chrF n=6, β=2)."""
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def generated_lengths(preds: np.ndarray, pad_token_id: int, eos_token_id: int) -> list[int]:
    """Tokens per generated sequence, up to and including its first `eos_token_id`.

    Counting every token that is not padding is not enough: `generate` fills a sequence that finished early with
    `eos_token_id` up to the batch's longest, and the Trainer pads across batches with -100. The decoder start token
    (the pad token for Marian and T5) is not counted.
    """
    lengths = []
    for row in preds:
        tokens = row[(row != pad_token_id) & (row != -100)]
        ends = np.flatnonzero(tokens == eos_token_id)
        lengths.append(int(ends[0]) + 1 if len(ends) else len(tokens))
    return lengths


def bleu_signature() -> str:
    """sacrebleu's BLEU signature (tokenization, smoothing, version) for the model card."""
    bleu = sacrebleu.BLEU()
    bleu.corpus_score(["a"], [["a"]])  # the signature needs the number of references
    return str(bleu.get_signature())


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    paper = " ".join(f"--{k} {str(v).lower()}" for k, v in PAPER_DEFAULTS.items())
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TranslationClinicArguments, Seq2SeqTrainingArguments),
        description=f"Machine translation with hf-clinic. Defaults (the Admin paper's setup, override any): {paper}.",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            return parser.parse_dict({**PAPER_DEFAULTS, **json.load(f)})
    defaults = [item for key, value in PAPER_DEFAULTS.items() for item in (f"--{key}", str(value).lower())]
    return parser.parse_args_into_dataclasses(args=defaults + argv)


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
        f"device: {training_args.device}, optimizer: {training_args.optim}, admin: {clinic.admin}"
    )

    checkpoint = resolve_checkpoint(training_args)  # a folder, `last`, or None
    if model_args.model_name_or_path is not None:
        load_model_config(model_args.model_name_or_path)  # clear errors for a bad path, before any work
    set_seed(training_args.seed)
    raw = load_parallel_data(data_args)
    src, tgt = data_args.source_lang, data_args.target_lang
    if training_args.do_train and "train" not in raw:
        raise ValueError(f"--do_train needs a train split; found {list(raw)}")

    # Tokenizer: given, from the checkpoint we resume, or trained on the training data (main process first).
    os.makedirs(training_args.output_dir, exist_ok=True)
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    elif checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        with training_args.main_process_first(desc="tokenizer training"):
            if training_args.process_index == 0:
                texts = list(raw["train"][src]) + list(raw["train"][tgt])
                tokenizer = train_tokenizer(texts, model_args.vocab_size, data_args.max_source_length)
                tokenizer.save_pretrained(training_args.output_dir)
                logger.info("Trained a %d-piece Unigram tokenizer on %d sentences", len(tokenizer), len(texts))
            else:
                tokenizer = AutoTokenizer.from_pretrained(training_args.output_dir)

    num_beams = training_args.generation_num_beams or 1
    max_target_length = training_args.generation_max_length or data_args.max_target_length
    set_seed(training_args.seed)
    model = build_model(model_args, tokenizer, max_target_length, num_beams)
    prefix = data_args.source_prefix or ""

    def preprocess(examples):
        inputs = [prefix + s for s in examples[src]]
        return tokenizer(inputs, text_target=examples[tgt], max_length=data_args.max_source_length, truncation=True)

    def prepare(split, limit):
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return ds.map(preprocess, batched=True, remove_columns=ds.column_names)

    with training_args.main_process_first(desc="tokenization"):
        train_dataset = prepare("train", data_args.max_train_samples) if "train" in raw else None
        eval_dataset = prepare("validation", data_args.max_eval_samples) if "validation" in raw else None
        test_dataset = prepare("test", data_args.max_predict_samples) if "test" in raw else None

    def decode(ids):
        ids = np.where(ids != -100, ids, tokenizer.pad_token_id)
        return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        preds = preds[0] if isinstance(preds, tuple) else preds
        metrics = translation_metrics(decode(preds), decode(labels))
        metrics["gen_len"] = float(np.mean(generated_lengths(preds, tokenizer.pad_token_id, tokenizer.eos_token_id)))
        return metrics

    callbacks, admin_cb, clip_cb = clinic_callbacks(clinic)  # hf-clinic
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
        callbacks=callbacks,
    )

    all_metrics, results = {}, []
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    gen_kwargs = {"max_length": max_target_length, "num_beams": num_beams}
    for split, ds, flag, prefix_ in (
        ("validation", eval_dataset, training_args.do_eval, "eval"),
        ("test", test_dataset, training_args.do_predict, "test"),
    ):
        if not flag:
            continue
        if ds is None:
            raise ValueError(
                f"--do_{'eval' if prefix_ == 'eval' else 'predict'} needs a {split} split; found {list(raw)}"
            )
        output = trainer.predict(ds, metric_key_prefix=prefix_, **gen_kwargs)
        metrics = dict(output.metrics, **{f"{prefix_}_samples": len(ds)})
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            path = Path(training_args.output_dir) / f"generated_predictions_{split}.txt"
            path.write_text("".join(line + "\n" for line in decode(output.predictions)), encoding="utf-8")
        trainer.log_metrics(prefix_, metrics)
        trainer.save_metrics(prefix_, metrics)
        all_metrics.update(metrics)
        if f"{prefix_}_bleu" in metrics:
            results += [MetricResult(m, metrics[f"{prefix_}_{m}"], split=split) for m in ("bleu", "chrf")]

    if training_args.do_train:
        if admin_cb is not None:  # hf-clinic: keep the Admin model (with ω) for further training; never published
            trainer.save_model(os.path.join(training_args.output_dir, "admin_checkpoint"))
        if trainer.is_world_process_zero():
            publish(
                trainer, model_args, data_args, results, eval_dataset or train_dataset, num_beams,
                admin_cb=admin_cb, clip_cb=clip_cb, push_to_hub=push_to_hub, command=command,
            )  # fmt: skip
        trainer.accelerator.wait_for_everyone()
    return all_metrics


def publish(
    trainer, model_args, data_args, results, sample_ds, num_beams, *, admin_cb, clip_cb, push_to_hub, command
):  # hf-clinic
    """Export a stock checkpoint + tokenizer + model card into output_dir, verify it, and push it if asked."""
    sample = sample_ds.select(range(min(8, len(sample_ds))))
    batch = trainer.data_collator([sample[i] for i in range(len(sample))])
    data_note = (
        f"Read from local parallel files ({data_args.data_dir})."
        if data_args.data_dir
        else f"Loaded from the Hub ({data_args.dataset_name})."
    )
    if data_args.max_train_samples:
        data_note += f" First {data_args.max_train_samples} training pairs only."
    data_note += f" BLEU and chrF: sacrebleu corpus scores ({bleu_signature()}), beam search with {num_beams} beams."
    base = model_args.base_model_id or (
        model_args.model_name_or_path
        if model_args.model_name_or_path and not os.path.isdir(model_args.model_name_or_path)
        else None
    )
    model = trainer.model
    arch = {
        k: getattr(model.config, k)
        for k in ("d_model", "encoder_layers", "decoder_layers", "num_layers", "num_decoder_layers")
        if hasattr(model.config, k)
    }
    publish_from_trainer(
        trainer,
        verify_batch=batch,
        push_to_hub=push_to_hub,
        task_type="translation",
        dataset_id=data_args.dataset_name,
        dataset_name=f"{_dataset_display(data_args)} {data_args.source_lang}-{data_args.target_lang}",
        dataset_config=data_args.dataset_config_name,
        dataset_note=data_note,
        results=results,
        base_model=base,
        language=[data_args.source_lang, data_args.target_lang],
        license=model_args.license,
        clip=clip_cb,
        admin_report=getattr(admin_cb, "report", None),
        hyperparameters={
            "from_scratch": model_args.model_name_or_path is None,
            "paper_init": model_args.paper_init,
            "vocab_size": len(trainer.processing_class),
            **arch,
            "label_smoothing_factor": trainer.args.label_smoothing_factor,
            "num_beams": num_beams,
        },
        command=command,
    )


def _dataset_display(data_args) -> str:
    name = data_args.dataset_name.split("/")[-1]
    return "Multi30k" if name.lower() == "multi30k" else name


if __name__ == "__main__":
    main()
