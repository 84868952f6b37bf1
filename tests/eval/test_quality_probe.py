"""The probe's weight decay chosen on validation, and max pooling that padding never wins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_padded

from quackae.eval.probes import linear_probe, tuned_linear_probe
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.config import POOLINGS, ModelFlags

GRID = (1e-3, 1e3)  # a light decay fits the features; a huge one leaves only the bias: the majority class


def imbalanced(n: int, features: int, signal: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, features) Gaussian features, labels 1 for about a fifth; feature 0 is shifted by ``signal`` per class."""
    y = (rng.random(n) < 0.2).astype(np.int64)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[:, 0] += signal * (2 * y - 1)
    return x, y


def reference_choice(train, val, test, decays):
    """Fit every decay, score validation by hand, keep the best (ties: the larger decay)."""
    best = None
    for decay in sorted(decays):
        accuracy = float((linear_probe(*train, val[0], 2, 0, weight_decay=decay) == val[1]).mean())
        if best is None or accuracy >= best[0]:
            best = (accuracy, decay)
    return best[1], linear_probe(*train, test, 2, 0, weight_decay=best[1])


@pytest.mark.parametrize(
    ("features", "signal", "train_items", "winner"),
    [
        (4, 3.0, 60, 1e-3),  # the signal separates the classes: fitting it wins
        (40, 0.0, 30, 1e3),  # pure noise, more features than items: fitting overfits, the majority class wins
    ],
)
def test_the_probe_picks_the_decay_that_wins_on_validation(features, signal, train_items, winner):
    rng = np.random.default_rng(0)
    train = imbalanced(train_items, features, signal, rng)
    val = imbalanced(200, features, signal, rng)
    test = imbalanced(200, features, signal, rng)
    accuracies = {d: float((linear_probe(*train, val[0], 2, 0, weight_decay=d) == val[1]).mean()) for d in GRID}
    assert accuracies[winner] >= max(accuracies.values()) - 1e-9
    assert abs(accuracies[GRID[0]] - accuracies[GRID[1]]) > 0.1  # one decay clearly wins
    predicted, decay = tuned_linear_probe(*train, *val, test[0], 2, 0, decays=GRID)
    assert decay == winner
    expected_decay, expected = reference_choice(train, val, test[0], GRID)
    assert decay == expected_decay and np.array_equal(predicted, expected)
    # the same rule whatever order the grid is given in
    assert tuned_linear_probe(*train, *val, test[0], 2, 0, decays=GRID[::-1])[1] == winner


def test_the_probe_without_validation_items_uses_the_middle_of_the_grid():
    rng = np.random.default_rng(1)
    train, test = imbalanced(40, 3, 3.0, rng), imbalanced(10, 3, 3.0, rng)
    empty_x, empty_y = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    predicted, decay = tuned_linear_probe(*train, empty_x, empty_y, test[0], 2, 0, decays=(1e-4, 1e-2, 1.0))
    assert decay == 1e-2 and predicted.shape == (10,)


# ---------------------------------------------------------------------------------------------- max pooling
def tiny(pooling: str) -> QuackAutoEncoder:
    return QuackAutoEncoder(
        num_embeddings=20, embed_size=8, hidden_size=16, pooling=pooling, dropout=0.0, word_dropout=0.0
    ).eval()


def test_max_pooling_never_takes_a_pad_even_when_every_state_is_negative():
    model = tiny("max")
    states = -torch.rand(2, 5, 16) - 0.1  # (B, T, H): every real state negative
    lengths = torch.tensor([3, 5])
    states[0, 3:] = 0.0  # pads hold zeros, as the encoder returns them
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T) true at tokens
    pooled = model.pool(torch.zeros(2, 16), states, mask)  # (B, H)
    torch.testing.assert_close(pooled[0], states[0, :3].max(dim=0).values)
    torch.testing.assert_close(pooled[1], states[1].max(dim=0).values)
    assert (pooled < 0).all()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encoding_size_is_h_per_pooled_part(pooling):
    parts = pooling.split("+")
    assert ModelFlags(hidden_size=16, pooling=pooling).encoding_size == 16 * len(parts)
    model = tiny(pooling)
    encoding, states = model(random_padded(3, 20, 1, 7, seed=2))
    assert encoding.shape == (3, 16 * len(parts)) == (3, model.encoding_size)
    # each part sits where the name puts it: final states are the final part alone
    if "final" in parts:
        model.set_pooling("final")
        final, _ = model(random_padded(3, 20, 1, 7, seed=2))
        at = parts.index("final") * 16
        torch.testing.assert_close(encoding[:, at : at + 16], final)
