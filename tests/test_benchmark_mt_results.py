"""benchmarks/mt_results.py: the unigram loss that the translation table reads training losses against."""

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mt_results import unigram_loss  # noqa: E402


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_unigram_loss_is_torchs_smoothed_cross_entropy_of_the_frequency_predictor(label_smoothing):
    vocab_size = 50
    generator = torch.Generator().manual_seed(0)
    frequencies = torch.distributions.Dirichlet(torch.full((vocab_size - 5,), 0.3)).sample()  # 5 tokens never occur
    tokens = torch.multinomial(frequencies, 4000, replacement=True, generator=generator)
    counts = Counter(tokens.tolist())
    # the smoothed target distribution t, used as the (fixed) prediction for every token
    t = torch.tensor([counts.get(v, 0) for v in range(vocab_size)], dtype=torch.float64) / len(tokens)
    t = (1 - label_smoothing) * t + label_smoothing / vocab_size
    logits = t.log().expand(len(tokens), vocab_size)
    reference = torch.nn.functional.cross_entropy(logits, tokens, label_smoothing=label_smoothing)
    assert unigram_loss(counts, vocab_size, label_smoothing) == pytest.approx(reference.item(), rel=1e-12)


def test_no_fixed_prediction_does_better():
    counts, vocab_size = Counter({0: 70, 1: 20, 2: 10}), 4
    best = unigram_loss(counts, vocab_size, 0.1)
    tokens = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    for seed in range(20):
        logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        loss = torch.nn.functional.cross_entropy(logits.expand(len(tokens), -1), tokens, label_smoothing=0.1)
        assert loss.item() > best
    assert unigram_loss(Counter({v: 1 for v in range(vocab_size)}), vocab_size, 0.1) == pytest.approx(
        math.log(vocab_size)
    )
