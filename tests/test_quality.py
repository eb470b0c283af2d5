"""The quality arithmetic against hand computations on a three-token vocabulary."""

from __future__ import annotations

import math

import torch

from falcon_exp.quality import common_prefix, kl_divergence, perplexity


def test_kl_divergence_by_hand():
    reference = torch.tensor([[0.5, 0.25, 0.25]]).log()
    other = torch.tensor([[0.25, 0.5, 0.25]]).log()
    # 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln(1) = 0.25 ln 2
    assert math.isclose(kl_divergence(reference, other).item(), 0.25 * math.log(2), rel_tol=1e-6)
    assert kl_divergence(reference, reference).item() == 0.0
    assert kl_divergence(other, reference).item() > 0  # not symmetric, never negative


def test_perplexity_by_hand():
    logprobs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]).log()
    targets = torch.tensor([0, 1])  # probabilities 0.5 and 0.25: mean NLL = 1.5 ln 2
    assert math.isclose(perplexity(logprobs, targets), 2 ** 1.5, rel_tol=1e-6)
    uniform = torch.full((4, 3), 1 / 3).log()
    assert math.isclose(perplexity(uniform, torch.tensor([0, 1, 2, 0])), 3.0, rel_tol=1e-6)


def test_common_prefix_counts_equal_leading_tokens():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
