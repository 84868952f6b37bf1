"""``QuackAutoEncoder``: a sequence-to-sequence autoencoder with attention.

The encoder is a bidirectional GRU over packed sequences. What an item's stored encoding is depends on ``pooling``:
``final`` (the last layer's final forward and backward states, (B, H)), ``mean`` (the mean of the encoder states over
the item's tokens, (B, H)), ``max`` (their element-wise maximum over the item's tokens, (B, H)), or several joined by
``+`` and concatenated in that order (``final+mean``: (B, 2H)). The decoder is a GRU started from the final states
(whatever is stored) with Luong-style (post-recurrent) scaled dot-product attention over the encoder states, and an
MLP on ``[context; decoder state]`` that predicts the next token.

Teacher-forced training runs as whole-sequence tensor operations: one packed recurrent call over all steps, one
batched attention, and vocabulary logits and cross-entropy only at the target's non-pad positions. Three training-only
switches push information through the encoding rather than around it: ``word_dropout`` replaces decoder input tokens
by the mask id (Bowman et al. 2016), ``attention_dropout`` zeroes the attention context at a share of decoder steps,
and ``denoise`` corrupts the encoder input. Free-running batches (``teacher_forcing_ratio`` < 1) and greedy
reconstruction go step by step, as they must.

Beside reconstruction (``reconstruction_weight``; at 0 the decoder neither runs nor trains), a bag-of-words term
(``bow_weight`` > 0; Miao et al. 2016, Zhao et al. 2017): per item, the mean over its tokens of
``-log_softmax(head(encoding))[token]`` with a linear head on the ``bow_pooling`` encoding, so its gradient reaches
the encoder only through the encoding. Reconstruction sums over an item's tokens, so the term is multiplied by the
item's own token count: weight 1 weighs it like one item's reconstruction, and it depends on the item alone.
``input_word_dropout`` deletes a share of the tokens that term's encoder sees (its own copy when reconstructing).

Shape glossary:
    B  batch size            T  input (encoder) width        S  decoder steps
    E  embedding size        H  hidden size (encoding size)  V  vocabulary size
    L  GRU layers            N  non-pad target tokens in a batch   P  a pooled encoding's width (H a part)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from quackae.attention import AttentionModule, AttentionScore
from quackae.modelconfig import ModelConfig
from quackae.recurrent import unpacked_gru

log = logging.getLogger(__name__)

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
LOGIT_CHUNK = 512  # target tokens per vocabulary-logit block in teacher-forced training


class QuackAutoEncoder(pl.LightningModule):
    """Seq2seq GRU autoencoder with attention; ``forward`` is the encoder alone.

    Defaults differ from the original thesis code where the original did not train well:
    ``learning_rate`` 3e-3 (the original's 1e-1 diverges with AdamW), ``learning_rate_min`` 1e-5,
    and the decoder starts from a learned start vector rather than the item's last token.
    """

    def __init__(self, num_embeddings: int | None = None, *, config: ModelConfig | None = None, **hparams: Any) -> None:
        """Build from ``config`` (default ``ModelConfig()``) with keyword overrides, the fields of ``ModelConfig``:
        ``QuackAutoEncoder(8000, embed_size=128, hidden_size=256)`` or ``QuackAutoEncoder(config=PRESETS["base"])``.

        Raises ``ValueError`` listing every bad or unknown hyper-parameter.
        """
        super().__init__()
        if num_embeddings is not None:
            hparams["num_embeddings"] = num_embeddings
        config = (config or ModelConfig()).replace(**hparams)
        self.config = config
        self.save_hyperparameters(dataclasses.asdict(config))
        num_embeddings, embed_size, hidden_size = config.num_embeddings, config.embed_size, config.hidden_size
        self.num_embeddings = num_embeddings
        self.hidden_size = hidden_size
        self.layers = config.layers
        self.pad_id = config.pad_id
        self.pooling = config.pooling
        self.encoding_size = config.encoding_size
        self.bow_pooling = config.bow_pooling or config.pooling  # fixed here: set_pooling never changes it

        self.embed = nn.Embedding(num_embeddings, embed_size, padding_idx=config.pad_id)
        self.drop = nn.Dropout(config.dropout)  # on embeddings and on the predictor's input; identity in eval mode
        # Each direction gets half the hidden size, so the encoding is (B, H).
        self.encoder = nn.GRU(
            embed_size, hidden_size // 2, num_layers=config.layers, batch_first=True, bidirectional=True
        )
        self.start = nn.Parameter(torch.randn(embed_size) * 0.1)  # learned first decoder input
        self.decoder = nn.GRU(embed_size, hidden_size, num_layers=config.layers, batch_first=True)
        self.attention_score = AttentionScore(hidden_size)
        self.attention = AttentionModule()
        self.predict = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.LeakyReLU(),
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size),
            nn.LeakyReLU(),
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, num_embeddings),
        )
        bow_width = len(self.bow_pooling.split("+")) * hidden_size  # P; the head is made after every other weight
        self.bow = nn.Linear(bow_width, num_embeddings) if config.bow_weight > 0 else None
        if config.reconstruction_weight == 0:  # the decoder never runs in training: DDP must not wait for its gradients
            for part in (self.start, self.decoder, self.predict):
                part.requires_grad_(False)

    # ------------------------------------------------------------------ input checks
    def mask_input(self, padded: torch.Tensor) -> torch.Tensor:
        """Boolean (B, T), True where ``padded`` holds a token rather than the pad id."""
        return padded.ne(self.pad_id)

    def _check(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate token ids (B, T); return ``(x as long, mask (B, T), lengths on the CPU (B,))``.

        One host sync covers every check: ids in ``[0, V)``, no empty row, padding only at the end.
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a (B, T) tensor of token ids, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"expected token ids of shape (B, T), got shape {tuple(x.shape)}")
        if x.dtype not in _INT_DTYPES:
            raise ValueError(f"expected integer token ids (torch.long), got {x.dtype}")
        if x.size(0) == 0 or x.size(1) == 0:
            raise ValueError(f"empty batch of token ids, shape {tuple(x.shape)}")
        x = x.long()
        mask = self.mask_input(x)  # (B, T)
        lengths = mask.sum(dim=1)  # (B,)
        holes = (mask[:, 1:] & ~mask[:, :-1]).any().view(1)  # a token after padding
        stats = torch.cat([lengths, x.min().view(1), x.max().view(1), holes.long()]).cpu()
        lengths_cpu, low, high, has_holes = stats[:-3], int(stats[-3]), int(stats[-2]), bool(stats[-1])
        if low < 0 or high >= self.num_embeddings:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside [0, {self.num_embeddings}); the data and the model's "
                "vocabulary do not match"
            )
        if int(lengths_cpu.min()) == 0:
            row = int((lengths_cpu == 0).nonzero()[0])
            raise ValueError(f"row {row} of the batch is empty (only pad id {self.pad_id}); drop empty sequences")
        if has_holes:
            raise ValueError(f"pad id {self.pad_id} appears before a real token; pad sequences at the end only")
        return x, mask, lengths_cpu

    def set_pooling(self, pooling: str) -> None:
        """Store ``pooling`` from now on (one of ``POOLINGS``); training is unaffected."""
        self.config = self.config.replace(pooling=pooling, bow_pooling=self.bow_pooling)  # checks the name
        self.hparams.pooling = self.pooling = pooling
        self.hparams.bow_pooling = self.bow_pooling  # a reloaded model keeps its head's input
        self.encoding_size = self.config.encoding_size

    # ------------------------------------------------------------------ encoder
    def pool(
        self, final: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, pooling: str | None = None
    ) -> torch.Tensor:
        """The stored encoding: ``final`` (B, H), ``states`` (B, T, H) zero at pads, ``mask`` (B, T) true at tokens
        (on the states' device: no host copy per batch).

        Returns (B, k H) for a ``pooling`` (default: the stored one) of k parts, concatenated in the order named.
        """
        pooled = []
        for part in (pooling or self.pooling).split("+"):
            if part == "final":
                pooled.append(final)  # (B, H)
            elif part == "mean":
                count = mask.sum(dim=1, keepdim=True).to(states.dtype).clamp(min=1)  # (B, 1)
                pooled.append(states.sum(dim=1) / count)  # (B, H): pads hold zeros, the sum covers real tokens only
            else:  # max: padding at -inf never wins (every row has a token)
                pooled.append(states.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1))  # (B, H)
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)  # (B, k H)

    def _encode(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, width = x.shape
        embedded = self.drop(self.embed(x))  # (B, T, E)
        if embedded.requires_grad and embedded.device.type == "cpu":
            # Training on a CPU: the packed call's backward pass grows with T squared there (see unpacked_gru).
            states, last = unpacked_gru(self.encoder, embedded, lengths.to(x.device))  # (B, T, H), (2L, B, H/2)
        else:
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            out, last = self.encoder(packed)  # last: (2L, B, H/2), in the caller's batch order
            states, _ = pad_packed_sequence(out, batch_first=True, total_length=width)  # (B, T, H), zeros at pads
        last = last.view(self.layers, 2, batch, self.hidden_size // 2)[-1]  # (2, B, H/2), last layer
        encoding = last.permute(1, 0, 2).reshape(batch, self.hidden_size)  # (B, H): [forward; backward]
        return encoding, states

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids ``x`` (B, T), right-padded with the pad id.

        Returns ``(encoding (B, encoding_size), states (B, T, H))``: the encoding is pooled as ``pooling`` says; states
        at padded positions are 0. An item's encoding does not depend on its padding or its batch mates. Raises
        ``ValueError`` for ids outside ``[0, V)``, empty rows, non-integer or non-2-D input.
        """
        x, mask, lengths = self._check(x)
        final, states = self._encode(x, lengths)  # (B, H), (B, T, H)
        return self.pool(final, states, mask), states

    # ------------------------------------------------------------------ noise
    def _corrupt(
        self, x: torch.Tensor, mask: torch.Tensor, share: float | None = None, mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token deletion or masking of a ``share`` of the encoder input (default: ``denoise`` and ``denoise_mode``);
        returns ``(x', mask', lengths' on CPU)``."""
        p = self.hparams.denoise if share is None else share
        drop = (torch.rand(x.shape, device=x.device) < p) & mask  # (B, T)
        if (mode or self.hparams.denoise_mode) == "mask":
            noisy = x.masked_fill(drop, self.hparams.mask_id)
            return noisy, mask, mask.sum(dim=1).cpu()
        keep = mask & ~drop
        keep[:, 0] |= ~keep.any(dim=1)  # every row keeps at least one token
        # A stable sort of "dropped" flags moves kept tokens to the front in their order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (B, T)
        kept = keep.sum(dim=1, keepdim=True)  # (B, 1)
        new_mask = torch.arange(x.size(1), device=x.device).unsqueeze(0) < kept  # (B, T)
        noisy = x.gather(1, order).masked_fill(~new_mask, self.pad_id)  # (B, T)
        return noisy, new_mask, kept.squeeze(1).cpu()

    def _word_dropout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder input ids (B, S) with a ``word_dropout`` share of non-pad tokens replaced by the mask id
        (the pad id, whose embedding is zero, when the model has no mask id)."""
        replacement = self.hparams.mask_id if self.hparams.mask_id is not None else self.pad_id
        hit = (torch.rand(tokens.shape, device=tokens.device) < self.hparams.word_dropout) & tokens.ne(self.pad_id)
        return tokens.masked_fill(hit, replacement)  # (B, S)

    # ------------------------------------------------------------------ decoder
    def _initial_hidden(self, encoding: torch.Tensor) -> torch.Tensor:
        return encoding.unsqueeze(0).expand(self.layers, -1, -1).contiguous()  # (L, B, H)

    def _decode_step(
        self, token_embed: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step: ``token_embed`` (B, E), ``hidden`` (L, B, H) -> logits (B, V), hidden, weights (B, T)."""
        out, hidden = self.decoder(token_embed.unsqueeze(1), hidden)  # (B, 1, H), (L, B, H)
        scores = self.attention_score(states, out)  # (B, T, 1)
        context, weights = self.attention(states, scores, mask, check=False)  # (B, H), (B, T, 1)
        logits = self.predict(self.drop(torch.cat([context, out.squeeze(1)], dim=-1)))  # (B, 2H) -> (B, V)
        return logits, hidden, weights.squeeze(-1)

    def _steps(self, width: int) -> int:
        limit = self.hparams.max_decode_length
        return width if limit is None else min(limit, width)

    def _teacher_forced(
        self,
        target: torch.Tensor,
        encoding: torch.Tensor,
        states: torch.Tensor,
        enc_mask: torch.Tensor,
        target_lengths: torch.Tensor,
        accuracy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Whole-sequence teacher forcing; returns ``(cross-entropy (N,), correct (N,) bool, step weights (N,))``.

        The N tokens are the target's non-pad positions within the decoded steps (time-major); each token's step weight
        is 1 / (items still present at its step), so the weighted sum equals ``loss_over_time`` without computing
        vocabulary logits at padded positions. ``correct`` is None without ``accuracy`` (the argmax costs a pass over
        the logits). Logits are made ``LOGIT_CHUNK`` tokens at a time: the same numbers, but the (N, V) block never has
        to exist at once, which keeps it in cache on a CPU (about 20% faster here).
        """
        batch = target.size(0)
        steps = self._steps(target.size(1))
        lengths = target_lengths.clamp(max=steps)  # (B,) on CPU
        previous = target[:, : steps - 1]  # (B, S-1)
        if self.training and self.hparams.word_dropout > 0:
            previous = self._word_dropout(previous)
        previous = self.drop(self.embed(previous))  # (B, S-1, E)
        inputs = torch.cat([self.start.expand(batch, 1, -1), previous], dim=1)  # (B, S, E)
        # The decoder is causal, so outputs at real positions never see the padding after them: one
        # unpacked call is exact and lets the fused (oneDNN / cuDNN) kernel run.
        decoded, _ = self.decoder(inputs, self._initial_hidden(encoding))  # (B, S, H)
        scores = self.attention_score(states, decoded)  # (B, T, S)
        context, _ = self.attention.attend_all(states, scores, enc_mask, check=False)  # (B, S, H)
        if self.training and self.hparams.attention_dropout > 0:
            shown = torch.rand(context.shape[:2], device=context.device) >= self.hparams.attention_dropout  # (B, S)
            context = context * shown.unsqueeze(-1).to(context.dtype)  # (B, S, H), zero where dropped
        features = torch.cat([context, decoded], dim=-1)  # (B, S, 2H)
        time, item, weights = (t.to(target.device, non_blocking=True) for t in _valid_positions(lengths, steps))
        selected = self.drop(features[item, time])  # (N, 2H)
        wanted = target[item, time]  # (N,)
        losses, correct = [], []
        for rows, goal in zip(selected.split(LOGIT_CHUNK), wanted.split(LOGIT_CHUNK), strict=True):
            logits = self.predict(rows).float()  # (n, 2H) -> (n, V)
            losses.append(F.cross_entropy(logits, goal, reduction="none"))  # (n,)
            if accuracy:
                # max's indices are argmax's (the first of equal maxima) at a quarter of its cost on a CPU
                correct.append(logits.detach().max(dim=-1).indices == goal)  # (n,)
        return torch.cat(losses), torch.cat(correct) if accuracy else None, weights

    def _free_running(
        self, target: torch.Tensor, encoding: torch.Tensor, states: torch.Tensor, enc_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder fed its own samples step by step: ``(loss_over_time, token cross-entropy, token accuracy)``."""
        batch = target.size(0)
        hidden = self._initial_hidden(encoding)  # (L, B, H)
        token_embed = self.start.expand(batch, -1)  # (B, E)
        outputs = []
        for _ in range(self._steps(target.size(1))):
            logits, hidden, _ = self._decode_step(token_embed, hidden, states, enc_mask)  # (B, V)
            outputs.append(logits)
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(logits.float(), dim=-1), 1).squeeze(1)  # (B,)
            token_embed = self.drop(self.embed(sampled))  # (B, E)
        output = torch.stack(outputs, dim=1)  # (B, S, V)
        wanted = target[:, : output.size(1)]  # (B, S)
        valid = wanted.ne(self.pad_id)  # (B, S)
        token_ce = F.cross_entropy(output.float()[valid], wanted[valid])
        return self.loss_over_time(target, output), token_ce, (output.argmax(-1) == wanted)[valid].float().mean()

    # ------------------------------------------------------------------ losses
    def loss_over_time(self, original: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over time steps; each step's term is the mean over items present there.

        ``original`` (B, T) token ids, ``output`` (B, T', V) logits; the first ``min(T, T')`` steps
        count and padded positions contribute nothing (a step with no item present adds 0).
        """
        steps = min(original.size(1), output.size(1))
        target = original[:, :steps]  # (B, S)
        logits = output[:, :steps].transpose(1, 2).float()  # (B, V, S)
        ce = F.cross_entropy(logits, target, ignore_index=self.pad_id, reduction="none")  # (B, S), 0 at pads
        present = target.ne(self.pad_id).sum(dim=0).clamp(min=1)  # (S,)
        return (ce.sum(dim=0) / present).sum()

    def bag_of_words(self, pooled: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per item, ``-log_softmax(head(pooled))[token]`` summed over its tokens (``mask`` (B, T)): (B,)."""
        log_probs = F.log_softmax(self.bow(pooled).float(), dim=-1)  # (B, P) -> (B, V)
        return -(log_probs.gather(1, target) * mask).sum(dim=1)  # (B, T) -> (B,), padding adds nothing

    def _losses(
        self, target: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, accuracy: bool = True
    ) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted sum of the objectives) and its parts, 0-d each, of checked ids ``target`` (B, T):
        ``token_loss``/``token_acc`` with reconstruction, ``bow_loss`` (mean over items of the per-token mean)."""
        hp, rebuild = self.hparams, self.hparams.reconstruction_weight > 0
        own_view = self.bow is not None and self.training and hp.input_word_dropout > 0  # a copy, words deleted
        enc_in, enc_mask, enc_lengths = target, mask, lengths
        if own_view and not rebuild:
            enc_in, enc_mask, enc_lengths = self._corrupt(target, mask, hp.input_word_dropout, "delete")
        elif self.training and hp.denoise > 0:
            enc_in, enc_mask, enc_lengths = self._corrupt(target, mask)
        encoding, states = self._encode(enc_in, enc_lengths)  # (B, H), (B, T, H)
        parts, terms = {}, []
        if rebuild:
            if self.training and float(torch.rand(())) >= hp.teacher_forcing_ratio:
                loss, parts["token_loss"], parts["token_acc"] = self._free_running(target, encoding, states, enc_mask)
            else:
                ce, correct, weights = self._teacher_forced(target, encoding, states, enc_mask, lengths, accuracy)
                loss, parts["token_loss"] = (ce * weights).sum(), ce.mean()
                if accuracy:
                    parts["token_acc"] = correct.float().mean()
            terms.append(loss if hp.reconstruction_weight == 1 else hp.reconstruction_weight * loss)
        if self.bow is not None:
            if own_view and rebuild:
                enc_in, enc_mask, enc_lengths = self._corrupt(target, mask, hp.input_word_dropout, "delete")
                encoding, states = self._encode(enc_in, enc_lengths)  # (B, H), (B, T, H)
            summed = self.bag_of_words(self.pool(encoding, states, enc_mask, self.bow_pooling), target, mask)  # (B,)
            terms.append(hp.bow_weight * summed.mean())
            parts["bow_loss"] = (summed / mask.sum(dim=1)).mean()
        return {"loss": sum(terms[1:], terms[0]), **parts}

    def _step_loss(self, batch: Any, stage: str) -> torch.Tensor:
        target, mask, lengths = self._check(batch[1] if isinstance(batch, (tuple, list)) else batch)
        parts = self._losses(target, mask, lengths)
        when = {"on_step": stage == "train", "on_epoch": True, "sync_dist": stage != "train"}
        for name, value in parts.items():
            self.log(f"{stage}_{name}", value, prog_bar=name == "loss", batch_size=target.size(0), **when)
        return parts["loss"]

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch of token ids (B, T), without Lightning logging (benchmarks)."""
        return self._losses(*self._check(x), accuracy=False)["loss"]

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step_loss(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step_loss(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step_loss(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> tuple[Any, torch.Tensor]:
        """``(metadata, x (B, T))`` -> ``(metadata, encoding (B, encoding_size))``, pooled as ``pooling`` says.

        A batch ``(metadata, x, True)`` (``TokenizedDataModule(predict_attention=True)``, for ``quackae encode --png
        attention``) also asks for the greedy reconstruction: a third element ``(attention (B, S, T), tokens (B, S), x
        (B, T))`` for the heat maps.
        """
        metadata, x, *request = batch
        encoding, _ = self(x)  # (B, encoding_size)
        if not (request and request[0]):
            return metadata, encoding
        tokens, attention = self.reconstruct(x, max_length=x.size(1), return_attention=True)  # (B, S), (B, S, T)
        return metadata, encoding, (attention, tokens, x)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move only the token tensor of a ``(metadata, x)`` batch; the metadata (a ``pyarrow.Table`` or a
        list of dicts) stays on the host for the writer."""
        host_metadata = isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and not torch.is_tensor(batch[0])
        if host_metadata and torch.is_tensor(batch[1]):
            return batch[0], batch[1].to(device, non_blocking=True), *batch[2:]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with cosine annealing from ``learning_rate`` to ``learning_rate_min``: over ``lr_max_epochs`` epochs
        when > 0, else over the trainer's ``max_steps`` when set (stepped per optimizer step), else ``max_epochs``."""
        trainer = self._trainer
        # A gradient scaler (16-mixed) must unscale before clipping, which Lightning does for unfused optimizers only.
        scaled = trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None
        optimizer = adamw(self.parameters(), self.hparams.learning_rate, self.hparams.weight_decay, fused=not scaled)
        interval, period = "epoch", self.hparams.lr_max_epochs
        max_steps, max_epochs = (trainer.max_steps, trainer.max_epochs) if trainer is not None else (-1, None)
        if period <= 0 and max_steps is not None and max_steps > 0:
            interval, period = "step", max_steps
        elif period <= 0:
            period = max(1, max_epochs or 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, period, self.hparams.learning_rate_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip the gradients' norm here when no gradient scaler is in play (32-true, bf16-mixed): Lightning's
        mixed-precision plugin refuses to clip for a fused optimizer even under bf16-mixed, where nothing is scaled."""
        unscaled = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if gradient_clip_val and unscaled and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, max_length: int | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding of ``x`` (B, T) from its own encoding -> LongTensor (B, S).

        Decodes at most ``max_length`` steps (default ``max_decode_length``, else T). After an item
        emits ``eos_id`` its remaining positions hold the pad id, and decoding stops once every item
        has. With ``return_attention`` also returns the attention weights (B, S, T).
        """
        x, mask, lengths = self._check(x)
        encoding, states = self._encode(x, lengths)
        steps = max_length or self.hparams.max_decode_length or x.size(1)
        hidden = self._initial_hidden(encoding)
        token_embed = self.start.expand(x.size(0), -1)  # (B, E)
        eos = self.hparams.eos_id
        done = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)  # (B,)
        tokens, attention = [], []
        for _ in range(steps):
            logits, hidden, weights = self._decode_step(token_embed, hidden, states, mask)
            token = logits.argmax(dim=-1).masked_fill(done, self.pad_id)  # (B,)
            tokens.append(token)
            attention.append(weights)
            if eos is not None:
                done = done | token.eq(eos)
                if bool(done.all()):
                    break
            token_embed = self.embed(token)
        out = torch.stack(tokens, dim=1)  # (B, S)
        return (out, torch.stack(attention, dim=1)) if return_attention else out  # (B, S, T) attention


def adamw(parameters: Any, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where this torch build has it and ``fused``."""
    parameters = list(parameters)
    if fused:
        try:
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
            pass
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def _valid_positions(lengths: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-pad (time, item) positions of right-padded rows with CPU ``lengths`` (B,), time-major.

    Returns ``(time (N,), item (N,), weight (N,))`` with weight = 1 / (rows present at that time).
    """
    present = torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)  # (S, B)
    time, item = present.nonzero(as_tuple=True)  # (N,), (N,)
    per_step = present.sum(dim=1).clamp(min=1).to(torch.float32).reciprocal()  # (S,)
    return time, item, per_step[time]
