"""The text conditioning of a batch, as the denoisers of every teacher family take it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch


@dataclass
class Conditioning:
    """Text conditioning of a batch (dim 0 = sample): hidden states, SDXL pooled embeds, T5 attention mask."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (the on-disk cache stores exactly these)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Conditioning":
        return cls(**tensors)

    def __len__(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move to ``device``; floating tensors (not the integer mask) are cast to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self.map(move)

    def select(self, index: torch.Tensor | slice) -> "Conditioning":
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        names = items[0].tensors().keys()
        return Conditioning.from_tensors({k: torch.cat([c.tensors()[k] for c in items]) for k in names})

    def where(self, use_other: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` where ``use_other`` (B,) is True, else self. ``other`` may have batch 1."""
        mine, theirs = self.tensors(), other.tensors()
        out = {}
        for k, v in mine.items():
            o = theirs[k].to(v.device).expand_as(v)
            mask = use_other.to(v.device).view(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(mask, o, v)
        return Conditioning.from_tensors(out)

    def expand(self, batch: int) -> "Conditioning":
        """Repeat a batch-1 conditioning (the null prompt) ``batch`` times."""
        return self.map(lambda t: t.expand(batch, *t.shape[1:]).contiguous())
