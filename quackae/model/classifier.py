"""``LatentClassifier``: an MLP over stored encodings, with their standardisation kept in its checkpoint.

Shape glossary: N items, H encoding size, C classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class LatentClassifier(pl.LightningModule):
    """MLP over encodings (H,) -> logits (C,), with standardisation stored in the checkpoint."""

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_sizes: tuple[int, ...] = (256,),
        dropout: float = 0.2,
        learning_rate: float = 1e-3,
        learning_rate_min: float = 1e-5,
        weight_decay: float = 1e-2,
        max_epochs: int = 100,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if input_size <= 0 or num_classes < 2:
            raise ValueError(f"need input_size > 0 and at least 2 classes, got {input_size} and {num_classes}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("std", torch.ones(input_size))
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else torch.ones(num_classes)
        self.register_buffer("class_weights", weights)

    def set_standardisation(self, features: np.ndarray) -> None:
        # in float64: the squares of large encodings overflow float32
        self.mean.copy_(torch.from_numpy(features.mean(axis=0, dtype=np.float64)))
        self.std.copy_(torch.from_numpy(features.std(axis=0, dtype=np.float64) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encodings (N, H) -> logits (N, C)."""
        return self.net((x - self.mean) / self.std)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)  # (N, C)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        accuracy = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.hparams.max_epochs), eta_min=self.hparams.learning_rate_min
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
