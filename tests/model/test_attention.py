from __future__ import annotations

import math

import pytest
import torch

from quackae.model.attention import AttentionModule, AttentionScore, attend, attention_scores


def test_score_equals_formula():
    torch.manual_seed(0)
    states, context = torch.randn(3, 5, 8), torch.randn(3, 8)
    scores = AttentionScore(8)(states, context)
    assert scores.shape == (3, 5, 1)
    for b in range(3):
        for t in range(5):
            expected = float(states[b, t] @ context[b]) / math.sqrt(8)
            assert scores[b, t, 0].item() == pytest.approx(expected, abs=1e-5)


def test_batched_queries_match_single_queries():
    torch.manual_seed(1)
    states, queries = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    batched = attention_scores(states, queries)  # (B, T, S)
    for s in range(3):
        torch.testing.assert_close(batched[:, :, s : s + 1], AttentionScore(4)(states, queries[:, s]))


def test_masked_weights_are_exactly_zero_and_rows_sum_to_one():
    torch.manual_seed(2)
    states, scores = torch.randn(3, 6, 4), torch.randn(3, 6, 1) * 50
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    before = scores.clone()
    context, weights = AttentionModule()(states, scores, mask)
    assert context.shape == (3, 4) and weights.shape == (3, 6, 1)
    assert torch.equal(weights[~mask], torch.zeros_like(weights[~mask]))
    torch.testing.assert_close(weights.sum(dim=1).squeeze(-1), torch.ones(3))
    assert torch.equal(scores, before), "the caller's scores were modified in place"
    expected = (states * weights).sum(dim=1)
    torch.testing.assert_close(context, expected)


def test_masked_states_do_not_change_context():
    torch.manual_seed(3)
    states, scores = torch.randn(2, 5, 4), torch.randn(2, 5, 1)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    noisy = states.clone()
    noisy[~mask] = 1e6
    a, _ = AttentionModule()(states, scores, mask)
    b, _ = AttentionModule()(noisy, scores, mask)
    torch.testing.assert_close(a, b)


def test_all_false_row_raises():
    states, scores = torch.randn(2, 3, 4), torch.randn(2, 3, 1)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="no present item"):
        AttentionModule()(states, scores, mask)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(B, T, 1\)"):
        AttentionModule()(torch.randn(2, 3, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="hidden size 4"):
        AttentionScore(4)(torch.randn(2, 3, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="bool tensor"):
        attend(torch.randn(2, 3, 4), torch.randn(2, 3, 1), torch.ones(2, 3))
