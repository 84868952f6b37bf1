"""Encodings from the device to the host without stalling the prediction thread.

On a GPU, ``tensor.cpu()`` waits for every kernel queued so far and only then copies: the prediction
thread could not queue the next batch until this one was finished and copied. ``to_host`` instead
queues a copy into pinned host memory behind the batch's kernels (``non_blocking``) and records a CUDA
event; the writer's thread waits on that event (``HostCopy.array``) while the prediction thread goes on
to the next batch. ``OVERLAP_ON_CPU`` takes the same path on a CPU (no pinning, no event), so tests
exercise it where there is no GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quackae.core.errors import QuackError

OVERLAP_ON_CPU = False  # a test switch: the overlapped path on CPU tensors too


class HostCopy:
    """A device-to-host copy in flight; ``array()`` waits for it and gives the float32 numpy array."""

    def __init__(self, tensor: torch.Tensor, event: Any) -> None:
        self.tensor = tensor
        self.event = event

    def array(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while the GPU finishes
            self.event = None
        return self.tensor.numpy()


def overlapped(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or OVERLAP_ON_CPU


def to_host(tensor: torch.Tensor) -> np.ndarray | HostCopy:
    """``tensor`` (B, H), any float dtype, as float32 on the host: a ``HostCopy`` to wait on when the copy is
    overlapped (``overlapped``), else the numpy array at once (one synchronous copy)."""
    tensor = tensor.detach()
    if not overlapped(tensor):
        return tensor.float().cpu().numpy()
    cuda = tensor.is_cuda
    source = tensor.float()  # the cast runs on the device: bf16 encodings are stored as float32
    # pinned blocks come from torch's caching host allocator: after the first batches no new pinning
    host = torch.empty(source.shape, dtype=torch.float32, pin_memory=cuda)
    host.copy_(source, non_blocking=cuda)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
    return HostCopy(host, event)


def host_array(value: np.ndarray | HostCopy) -> np.ndarray:
    return value.array() if isinstance(value, HostCopy) else value


def non_finite_error(ids: np.ndarray, matrix: np.ndarray, model: str | None) -> QuackError | None:
    """None when every encoding of a batch (ids (B,), matrix (B, H)) is finite, else the error that stops the job:
    a store never holds a NaN or infinite encoding, and one that would is not marked complete."""
    if np.isfinite(matrix).all():
        return None
    first = int(ids[np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0]])
    return QuackError(
        f"the model {model or ''} gave a non-finite encoding (NaN or infinity) for id {first}; nothing of that "
        "batch was stored and the store is not marked complete: the model diverged in training, train it again "
        "(for example with a lower --learning-rate)"
    )
