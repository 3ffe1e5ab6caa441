"""The training batch: what the loader yields and the backbone consumes.

It lives at the package root (not in ``pipelines/``) because both the loader and the backbone use
it, and the backbone must import neither Ray nor any modality (DESIGN.md, deviation noted there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch


@dataclass
class TokenBatch:
    """One batch of one modality, padded to the longest sequence L in the batch.

    tokens:    (B, L, D) continuous tokens in the table's stored dtype (uint8 pixels 0..255, float16
               audio/point/series values, float32), or (B, L) int64 ids for discrete tokens. Padding
               positions hold 0. The loader does not widen to float32: that cast costs more than the
               rest of collating (fp16 -> fp32 of an audio batch: ~10 ms on a CPU core) and moves 2-4x
               the bytes to the device; adapters and objectives cast on the device (``.float()``).
    positions: (B, L, P) float32 coordinates on the modality's axes.
    padding:   (B, L) bool, True where there is no token (padding), False for real tokens.
    modality:  the registered modality name shared by every sample of the batch.
    labels:    (B,) int64 class indices, -1 where a sample has no label; or None.
    edges:     (B, E, 2) int64 token-index pairs, padded with -1; or None.
    ids:       the B sample ids.
    meta:      per-sample meta dicts (JSON from the table), for detokenising and drawing; may be empty.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    padding: torch.Tensor
    modality: str
    labels: torch.Tensor | None = None
    edges: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens per sample."""
        return (~self.padding).sum(dim=1)

    @property
    def is_discrete(self) -> bool:
        """Whether tokens are ids (integer, not uint8: uint8 tokens are pixel bytes)."""
        return not torch.is_floating_point(self.tokens) and self.tokens.dtype != torch.uint8

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TokenBatch:
        return self._map_tensors(lambda t: t.pin_memory())

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenBatch:
        """A copy with ``fn`` applied to every tensor field (None fields stay None)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self,
            tokens=f(self.tokens),
            positions=f(self.positions),
            padding=f(self.padding),
            labels=f(self.labels),
            edges=f(self.edges),
        )
