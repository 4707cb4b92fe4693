"""The from-scratch initialisation of Admin's experiments (fairseq's Transformer init).

Hugging Face initialises Linear and Embedding weights with N(0, 0.02²). The Admin papers trained fairseq models,
initialised with Xavier-uniform linears (zero biases) and N(0, d^-1/2) embeddings (std d^-1/2, padding row zero),
which, with Marian/fairseq's √d embedding scale, gives unit-variance token embeddings. That is the regime where
deep Post-LN training fails and Admin's profiled ω grow well above 1 (issue 4: 1.0 → 4.2 encoder, → 6.1 decoder on an
18+18 Marian); under HF's init the branches are tiny and ω stays near 1.

NOTE: fairseq's `MultiheadAttention` initialises q/k/v with Xavier gain 1/√2 when the three projections share a
dimension; here every Linear uses gain 1, as the paper describes ("Xavier-uniform linears") and as the issue's
reference measurements were made.

References:
    Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249 (experimental setup);
    fairseq `models/transformer.py` `Embedding()` / `Linear()` helpers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn


logger = logging.getLogger(__name__)

__all__ = ["paper_init"]


def paper_init(model: nn.Module) -> dict[str, int]:
    """Re-initialise `model` in place the way Admin's experiments initialised Transformers trained from scratch.

    * every `nn.Linear`: Xavier-uniform weight, zero bias;
    * every trainable `nn.Embedding`: N(0, d^-1/2) with d its embedding dimension, padding row set to zero;
    * norms (LayerNorm/RMSNorm-like modules with a 1-D `weight`): weight 1, bias 0.

    Frozen embeddings (Marian's sinusoidal positions) are left as they are. A Linear whose weight is tied to an
    embedding (`lm_head` ↔ `shared`) keeps the embedding's init, as in fairseq's shared embeddings. Call it before
    [`apply_admin`], which then profiles the re-initialised model. Pretrained weights are discarded: this is for
    training from scratch only.

    Args:
        model (`nn.Module`): the model to re-initialise.

    Returns:
        `dict[str, int]`: how many linears, embeddings and norms were re-initialised.

    Example:

    ```py
    >>> model = MarianMTModel(MarianConfig(encoder_layers=18, decoder_layers=18, scale_embedding=True))
    >>> paper_init(model)
    >>> apply_admin(model, [first_batch])
    ```
    """
    counts = {"linear": 0, "embedding": 0, "norm": 0}
    embedding_weights = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                if id(module.weight) in embedding_weights:
                    continue  # shared with an embedding already initialised (Marian's `shared`)
                nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**-0.5)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                embedding_weights.add(id(module.weight))
                counts["embedding"] += 1
        for module in model.modules():
            if isinstance(module, nn.Linear):
                if id(module.weight) in embedding_weights:
                    continue
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
                counts["linear"] += 1
            elif _is_norm(module):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                counts["norm"] += 1
    logger.info("paper_init: re-initialised %s", counts)
    return counts


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
        return module.weight is not None
    name = type(module).__name__.lower()
    weight = getattr(module, "weight", None)
    return ("norm" in name) and isinstance(weight, nn.Parameter) and weight.dim() == 1
