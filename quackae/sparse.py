"""The bag-of-tokens probe at any corpus size: sparse log(1 + count) features and the linear probe on them.

``token_columns`` reads a token-id list column of an Arrow table as two flat arrays (offsets and
values, as Arrow holds them); ``bag_csr`` turns those into a CSR matrix of log(1 + count) with no
per-item Python; ``SparseProbe`` fits the same model as ``probes.linear_probe`` (softmax regression
on standardised features, L2 on the weights, full-batch L-BFGS, the same initial weights) without
ever making the (N, V) matrix dense. Standardising would fill the matrix, so the features are only
scaled by 1/std and the centring is moved into the logits: w . (x - m) / s = w . (x / s) - w . (m / s).
Memory is O(nnz + C V), whatever N is.

Shape glossary: N items, V vocabulary (columns), C classes, T tokens in all, nnz stored cells.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Csr:
    """A float32 CSR matrix held as numpy arrays: row n is ``data[indptr[n]:indptr[n+1]]`` at ``indices``."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (nnz,) int64, sorted within each row
    data: np.ndarray  # (nnz,) float32
    width: int

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    def take(self, positions: np.ndarray) -> Csr:
        """The rows at ``positions`` (in that order), gathered with numpy."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, lengths = self.indptr[positions], np.diff(self.indptr)[positions]
        indptr = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # cell k of the result comes from cell starts[row] + (k - indptr[row]) of this matrix
        source = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lengths)
        return Csr(indptr, self.indices[source], self.data[source], self.width)

    def dense(self) -> np.ndarray:
        """The (N, V) float32 matrix (for small matrices and tests)."""
        out = np.zeros((self.rows, self.width), dtype=np.float32)
        out[np.repeat(np.arange(self.rows), np.diff(self.indptr)), self.indices] = self.data
        return out


def token_columns(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (N + 1,), values (T,))`` int64 of an Arrow list column (array or chunked): item n holds
    ``values[offsets[n]:offsets[n + 1]]``. A null list counts as empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return offsets, values


def bag_csr(offsets: np.ndarray, values: np.ndarray, vocab: int) -> Csr:
    """log(1 + count) of each token id per item as CSR (N, vocab); ``values`` must lie in [0, vocab)."""
    count = len(offsets) - 1
    rows = np.repeat(np.arange(count, dtype=np.int64), np.diff(offsets))  # (T,)
    keys = rows * vocab + np.asarray(values, dtype=np.int64)  # (T,) one key per (item, token id)
    unique, counts = np.unique(keys, return_counts=True)  # sorted: by item, then by token id
    del rows, keys
    item = unique // vocab
    indptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(item, minlength=count), out=indptr[1:])
    return Csr(indptr, unique - item * vocab, np.log1p(counts).astype(np.float32), vocab)


def varying(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Which columns vary over the training rows, from their float64 ``mean`` and ``variance``: the probe
    leaves the others out (a column constant there carries nothing a linear model can learn from those
    rows, its weight's optimum is 0, and standardising it would divide by 0). The tolerance absorbs the
    rounding of a variance computed from sums."""
    return variance > 1e-12 * np.maximum(mean**2, 1.0)


class _SparseTimesWeight(torch.autograd.Function):
    """``Z @ W.T`` (N, C) for a sparse CSR ``Z`` (N, V) and a dense ``W`` (C, V); the gradient for ``W`` is
    ``(Z.T @ G).T`` with ``Z.T`` held as its own CSR, so neither pass makes anything (N, V) dense."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, z: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        ctx.z_t = z_t
        return torch.sparse.mm(z, weight.t())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return torch.sparse.mm(ctx.z_t, grad).t(), None, None


def _torch_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A torch CSR tensor sharing the arrays (built here, so valid by construction: no invariant check)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(data), size=shape,
            check_invariants=False,
        )  # fmt: skip


class SparseProbe:
    """``probes.linear_probe`` on sparse features: the training matrix is scaled and indexed once, then fitted
    with each weight decay asked for (``fit``).

    Scaling: ``mean`` and ``std`` of each column over the training rows (float64, ``std`` + 1e-6 as the
    dense probe has it); a column that is constant over the training rows (a token none of them has,
    or all of them alike) is left out, as its weight's optimum is 0 whatever the decay.
    """

    def __init__(self, train: Csr, train_y: np.ndarray, classes: int, seed: int) -> None:
        rows, width = train.rows, train.width
        self.classes, self.seed, self.width = classes, seed, width
        sums = np.bincount(train.indices, weights=train.data, minlength=width)
        squares = np.bincount(train.indices, weights=np.square(train.data, dtype=np.float64), minlength=width)
        mean = sums / rows
        variance = np.maximum(squares / rows - mean**2, 0.0)
        std = np.sqrt(variance) + 1e-6
        varies = varying(mean, variance)
        self.scale = np.where(varies, 1.0 / std, 0.0).astype(np.float32)  # (V,)
        self.shift = torch.from_numpy(np.where(varies, mean / std, 0.0).astype(np.float32))  # (V,)
        self.z = self._scaled(train)
        order = np.argsort(train.indices, kind="stable")  # Z.T as CSR: cells by column, rows ascending
        t_indptr = np.zeros(width + 1, dtype=np.int64)
        np.cumsum(np.bincount(train.indices, minlength=width), out=t_indptr[1:])
        t_rows = np.repeat(np.arange(rows, dtype=np.int64), np.diff(train.indptr))[order]
        self.z_t = _torch_csr(t_indptr, t_rows, train.data[order] * self.scale[train.indices[order]], (width, rows))
        self.y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))

    def _scaled(self, matrix: Csr) -> torch.Tensor:
        data = matrix.data * self.scale[matrix.indices]
        return _torch_csr(matrix.indptr, matrix.indices, data, (matrix.rows, self.width))

    def fit(self, weight_decay: float, tests: list[Csr], steps: int = 300) -> list[np.ndarray]:
        """Fit with ``weight_decay`` from the dense probe's initial weights; class predictions for each of ``tests``."""
        torch.manual_seed(self.seed)
        layer = nn.Linear(self.width, self.classes)  # the dense probe's initial weights, drawn the same way
        weight, bias = layer.weight, layer.bias
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = _SparseTimesWeight.apply(weight, self.z, self.z_t) - weight @ self.shift + bias  # (N, C)
            loss = F.cross_entropy(logits, self.y) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            offset = bias - weight @ self.shift  # (C,)
            return [(torch.sparse.mm(self._scaled(m), weight.t()) + offset).argmax(-1).numpy() for m in tests]
