"""The domain-agnostic masked transformer: embed -> mask -> encode (visible only) -> decode.

Follows MAE (He et al., 2022, ``models_mae.py``): the encoder sees only the visible tokens of each
sample, gathered and padded to the longest visible count of the batch (the masking ratio applies
to each sample's real tokens, so visible counts differ when lengths differ); the MAE decoder
un-shuffles mask tokens back to their positions and runs a light transformer over all of them.
The CrossMAE decoder (Fu et al., 2024) instead lets queries at the positions to reconstruct
cross-attend to the encoder features only, and can score a fraction of the masked tokens.
Masking strategies live in ``masking.py``; the model knows nothing about modalities beyond the
adapter configs (``adapters.py``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maskloom.backbone.adapters import InputAdapter, OutputAdapter, prepare_positions
from maskloom.backbone.blocks import Block, CrossBlock, key_mask, segment_mask
from maskloom.backbone.config import ModelConfig
from maskloom.backbone.linear import Linear
from maskloom.backbone.masking import (
    AdaptiveSampler,
    LearnedMasking,
    block_mask,
    num_masked,
    rand,
    random_mask,
    random_mask_packed,
    segment_counts,
    segment_topk_mask,
    topk_mask,
    tube_mask,
)
from maskloom.batch import TokenBatch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "maskloom.backbone"
FORMAT_VERSION = 1


@dataclass
class MaskedOutput:
    """What one masked-modeling forward pass returns."""

    pred: Tensor
    """(B, L, Dout) predictions at every position (meaningful where ``target_mask``)."""
    mask: Tensor
    """(B, L) bool, True = masked (removed from the encoder), never on padding."""
    target_mask: Tensor
    """(B, L) bool, True = scored token (== mask, or a subset of it for the cross decoder)."""
    log_prob: Tensor | None = None
    """(B, L) adaptive masking: log-probability of each token under the sampler (0 on padding)."""
    aux: dict[str, Tensor] = field(default_factory=dict)
    """Extras: ``encoded`` (B, V, dim) final encoder output of the visible tokens, ``visible_index``
    (B, V) their positions in L, ``visible_padding`` (B, V) bool; learned masking adds
    ``mask_score`` (B, L) (the summed attention of the chosen queries)."""


@dataclass
class Features:
    """Representations of unmasked inputs, for probes and fine-tuning."""

    pooled: Tensor
    """(B, dim) mean over real tokens of the final encoder output; (N, dim), one per sample, for a
    packed batch."""
    tokens: Tensor
    """(B, L, dim) final encoder output per token (padding positions hold garbage)."""
    padding: Tensor
    """(B, L) bool, True = padding."""


def gather_index(select: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool selection -> index (B, S) of the selected positions in order, padded to the largest
    count S, and its padding (B, S) bool (True = slot beyond this sample's count)."""
    count = select.sum(1)  # (B,)
    s = int(count.max()) if select.numel() else 0
    order = (~select).to(torch.uint8).argsort(dim=1, stable=True)  # selected first, in order
    index = order[:, :s]
    pad = torch.arange(s, device=select.device)[None, :] >= count[:, None]
    return index, pad


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, D), index (B, S) -> (B, S, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class MaskedModel(nn.Module):
    """One masked transformer shared by every modality named in ``config.adapters``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = config.encoder, config.decoder
        for m, _ in config.adapters:
            if not m.isidentifier():
                raise ValueError(f"modality name {m!r} must be a Python identifier")
        self.inputs = nn.ModuleDict({m: InputAdapter(a, enc.dim) for m, a in config.adapters})
        self.outputs = nn.ModuleDict({m: OutputAdapter(a, dec.dim) for m, a in config.adapters})
        maskers: dict[str, nn.Module] = {}
        for m, _ in config.adapters:
            cfg = config.masking_for(m)
            if cfg.kind == "learned":
                maskers[m] = LearnedMasking(enc.dim, enc.heads, cfg)
            elif cfg.kind == "adaptive":
                maskers[m] = AdaptiveSampler(enc.dim, cfg)
        self.maskers = nn.ModuleDict(maskers)

        # encoder: pre-norm blocks with linearly increasing drop-path (timm/MAE)
        rates = torch.linspace(0, enc.drop_path, enc.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(enc.dim, enc.heads, mlp_ratio=enc.mlp_ratio, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(enc.dim)
        self.edge_bias = nn.Parameter(torch.zeros(enc.heads)) if enc.edge_bias else None

        # decoder
        self.decoder_embed = Linear(enc.dim, dec.dim)
        self.mask_token = nn.Parameter(torch.zeros(dec.dim))
        block = Block if dec.kind == "mae" else CrossBlock
        self.decoder_blocks = nn.ModuleList(
            block(dec.dim, dec.heads, mlp_ratio=dec.mlp_ratio) for _ in range(dec.depth)
        )
        self.decoder_norm = nn.LayerNorm(dec.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings and mask token."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ stages

    def _check_batch(self, batch: TokenBatch) -> None:
        if batch.modality not in self.inputs:
            raise ValueError(f"no adapter for modality {batch.modality!r}; model has {list(self.inputs)}")
        b, n = batch.padding.shape
        if batch.tokens.shape[:2] != (b, n) or batch.positions.shape[:2] != (b, n):
            raise ValueError(
                f"batch shapes disagree: tokens {tuple(batch.tokens.shape)}, positions "
                f"{tuple(batch.positions.shape)}, padding {tuple(batch.padding.shape)}"
            )
        if batch.segments is None:
            if n == 0 or bool((batch.padding.all(1)).any()):
                raise ValueError("every sample of a batch needs at least one real token")
            return
        if batch.segments.shape != (b, n):
            raise ValueError(
                f"batch shapes disagree: segments {tuple(batch.segments.shape)}, padding {(b, n)}"
            )
        if bool(((batch.segments < 0) != batch.padding).any()):
            raise ValueError("a packed batch's segments must be -1 exactly on its padding")
        if n == 0 or bool((segment_counts(batch.segments, batch.num_samples) == 0).any()):
            raise ValueError("every sample of a batch needs at least one real token")
        kind = self.config.masking_for(batch.modality).kind
        if kind != "random":
            raise ValueError(
                f"packed batches (several samples per row) support random masking only; "
                f"{batch.modality!r} uses {kind!r} masking: load it without packing"
            )

    def embed(self, batch: TokenBatch, positions: Tensor) -> Tensor:
        """tokens + coordinates -> (B, L, dim) through the modality's input adapter."""
        return self.inputs[batch.modality](batch.tokens, positions)

    def choose_mask(
        self,
        x: Tensor,
        batch: TokenBatch,
        *,
        generator: torch.Generator | None,
        progress: float,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """-> mask (B, L) bool (True = masked), log_prob (B, L) | None, latents (B, Q, dim) | None, aux.

        A ``mask`` given by the caller is used as is (its padding entries are cleared)."""
        cfg = self.config.masking_for(batch.modality)
        padding = batch.padding
        log_prob = latents = None
        aux: dict[str, Tensor] = {}
        if batch.segments is not None:  # packed: random masking only (checked in _check_batch)
            if mask is None:
                return (
                    random_mask_packed(batch.segments, cfg.ratio, batch.num_samples, generator),
                    None,
                    None,
                    aux,
                )
            mask = mask.to(torch.bool) & ~padding
            seen = segment_counts(batch.segments.masked_fill(mask, -1), batch.num_samples)
            if bool((seen == 0).any()):
                raise ValueError("a given mask must leave at least one real token visible per sample")
            return mask, None, None, aux
        k = num_masked((~padding).sum(1), cfg.ratio)
        if mask is not None:
            mask = mask.to(torch.bool) & ~padding
            if bool((mask | padding).all(1).any()):
                raise ValueError("a given mask must leave at least one real token visible per sample")
        if cfg.kind == "learned":
            masker = self.maskers[batch.modality]
            logits, v = masker.attention_logits(x)
            if mask is None:
                mask, aux["mask_score"] = masker.choose(logits, padding, k, generator, progress)
            latents = masker.latents(logits, v, hidden=mask | padding)  # masked inputs at -inf
        elif cfg.kind == "adaptive":
            sampler = self.maskers[batch.modality]
            log_prob = sampler(x, padding)  # (B, L), -inf on padding
            if mask is None:
                mask = sampler.sample(log_prob, padding, k, generator, progress)
            log_prob = log_prob.masked_fill(padding, 0.0)
        elif mask is None:
            if cfg.kind == "random":
                mask = random_mask(padding, cfg.ratio, generator)
            elif cfg.kind == "tube":
                mask = tube_mask(batch.positions, padding, cfg.ratio, cfg.tube_axis, generator)
            else:  # block
                mask = block_mask(batch.positions, padding, cfg.ratio, cfg.block_size, generator)
        return mask, log_prob, latents, aux

    def _attention_mask(
        self,
        padding: Tensor,
        index: Tensor,
        edges: Tensor | None,
        seq_len: int,
        segments: Tensor | None = None,
    ) -> Tensor | None:
        """SDPA mask over a sequence whose slots hold original tokens ``index`` (B, S): the key-padding
        mask (block-diagonal by sample for a packed batch's ``segments``), plus (with ``edge_bias`` and
        edges) a learned per-head bias on adjacent pairs."""
        if segments is None:
            keep = key_mask(padding)
        else:
            keep = segment_mask(segments.gather(1, index).masked_fill(padding, -1))
        if self.edge_bias is None or edges is None:
            return keep
        b, s = index.shape
        slot = torch.full(
            (b, seq_len + 1), -1, dtype=torch.long, device=index.device
        )  # original token -> slot
        slot.scatter_(1, index, torch.arange(s, device=index.device).expand(b, s).masked_fill(padding, -1))
        e = edges.long().clamp(0, seq_len)  # out-of-range ids hit the spare column (slot -1)
        e = torch.where((edges < 0) | (edges >= seq_len), torch.full_like(e, seq_len), e)
        si, sj = slot.gather(1, e[..., 0]), slot.gather(1, e[..., 1])  # (B, E)
        valid = (si >= 0) & (sj >= 0)
        bi = torch.arange(b, device=index.device)[:, None].expand_as(si)
        adj = torch.zeros(b, s, s, dtype=torch.bool, device=index.device)
        adj[bi[valid], si[valid], sj[valid]] = True
        adj = adj | adj.transpose(1, 2)  # undirected
        bias = self.edge_bias[None, :, None, None] * adj[:, None].to(self.edge_bias.dtype)  # (B, H, S, S)
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return bias

    def forward_encoder(
        self,
        x: Tensor,
        index: Tensor,
        padding: Tensor,
        batch: TokenBatch,
        *,
        latents: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Encode the tokens x (B, L, dim) at ``index`` (B, S) (padded slots: ``padding`` (B, S)).
        -> (B, S, dim) after the final norm."""
        h = _gather(x, index)  # (B, S, dim)
        if latents is not None:  # SMA: visible tokens read the latents of the first layer
            h = self.maskers[batch.modality].read_back(h, latents)
        attn_mask = self._attention_mask(padding, index, batch.edges, batch.seq_len, batch.segments)
        for blk in self.blocks:
            h = blk(h, attn_mask, generator)
        return self.norm(h)

    def forward_decoder(
        self,
        encoded: Tensor,
        index: Tensor,
        vis_padding: Tensor,
        mask: Tensor,
        batch: TokenBatch,
        positions: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """encoded (B, V, dim) visible features -> pred (B, L, Dout) and target_mask (B, L)."""
        out = self.outputs[batch.modality]
        b, n = mask.shape
        y = self.decoder_embed(encoded)  # (B, V, Dd)
        if self.config.decoder.kind == "mae":
            y = torch.where(vis_padding[..., None], self.mask_token, y)
            full = self.mask_token.expand(b, n, -1)
            full = torch.scatter(full, 1, index[..., None].expand(-1, -1, y.shape[-1]), y)  # un-shuffle
            h = full + out.position_embedding(positions)
            attn_mask = key_mask(batch.padding) if batch.segments is None else segment_mask(batch.segments)
            for blk in self.decoder_blocks:
                h = blk(h, attn_mask, generator)
            return out.head(self.decoder_norm(h)), mask

        # CrossMAE: score a fraction of the masked tokens; queries cross-attend to encoder features
        frac = self.config.decoder.reconstruct_fraction
        seg = batch.segments
        target = mask
        if frac < 1.0:  # per sample (per row unless packed)
            n_mask = (
                mask.sum(1) if seg is None else segment_counts(seg.masked_fill(~mask, -1), batch.num_samples)
            )
            n_target = torch.round(n_mask.double() * frac).long().clamp(min=1).minimum(n_mask)
            noise = rand((b, n), generator, mask.device)
            if seg is None:
                target = topk_mask(noise, ~mask, n_target)
            else:
                target = segment_topk_mask(noise, ~mask, n_target, seg)
        t_index, t_padding = gather_index(target)  # (B, T)
        pred = torch.zeros(b, n, out.cfg.out_dim, dtype=y.dtype, device=y.device)
        if t_index.shape[1] == 0:
            return pred, target
        q = self.mask_token + out.position_embedding(_gather(positions, t_index))  # (B, T, Dd)
        if seg is None:
            mem_mask = key_mask(vis_padding)
        else:
            mem_mask = segment_mask(
                seg.gather(1, t_index).masked_fill(t_padding, -1),
                seg.gather(1, index).masked_fill(vis_padding, -1),
            )
        for blk in self.decoder_blocks:
            q = blk(q, y, mem_mask)
        p = out.head(self.decoder_norm(q)).masked_fill(t_padding[..., None], 0.0)  # (B, T, Dout)
        pred = torch.scatter(pred, 1, t_index[..., None].expand(-1, -1, p.shape[-1]), p)
        return pred, target

    # ------------------------------------------------------------------ public API

    def forward(
        self,
        batch: TokenBatch,
        *,
        generator: torch.Generator | None = None,
        progress: float = 1.0,
        mask: Tensor | None = None,
    ) -> MaskedOutput:
        """embed -> mask -> encode (visible only) -> decode.

        progress in [0, 1] is the share of training done (drives the learned/adaptive curriculum);
        ``mask`` (B, L) bool overrides the masking strategy (evaluation, visualisation, tests).
        Deterministic for a seeded ``generator``."""
        self._check_batch(batch)
        cfg = self.inputs[batch.modality].cfg
        positions = prepare_positions(
            cfg, batch.positions, training=self.training, generator=generator, segments=batch.segments
        )
        x = self.embed(batch, positions)  # (B, L, dim)
        mask, log_prob, latents, aux = self.choose_mask(
            x, batch, generator=generator, progress=progress, mask=mask
        )
        index, vis_padding = gather_index(~mask & ~batch.padding)  # (B, V)
        encoded = self.forward_encoder(x, index, vis_padding, batch, latents=latents, generator=generator)
        pred, target_mask = self.forward_decoder(
            encoded, index, vis_padding, mask, batch, positions, generator=generator
        )
        aux.update(encoded=encoded, visible_index=index, visible_padding=vis_padding)
        return MaskedOutput(pred=pred, mask=mask, target_mask=target_mask, log_prob=log_prob, aux=aux)

    def features(self, batch: TokenBatch) -> Features:
        """Encode every real token (no masking): pooled (B, dim) and per-token (B, L, dim) features."""
        self._check_batch(batch)
        cfg = self.inputs[batch.modality].cfg
        positions = prepare_positions(cfg, batch.positions, training=self.training, generator=None)
        x = self.embed(batch, positions)
        latents = None
        if self.config.masking_for(batch.modality).kind == "learned":
            masker = self.maskers[batch.modality]
            logits, v = masker.attention_logits(x)
            latents = masker.latents(logits, v, hidden=batch.padding)
        b, n = batch.padding.shape
        index = torch.arange(n, device=x.device).expand(b, n)
        tokens = self.forward_encoder(x, index, batch.padding, batch, latents=latents)
        if batch.segments is not None:  # packed: the mean of each sample's tokens, (N, dim)
            real = batch.segments >= 0
            seg = batch.segments[real]
            pooled = tokens.new_zeros(batch.num_samples, tokens.shape[-1]).index_add_(0, seg, tokens[real])
            counts = segment_counts(batch.segments, batch.num_samples).clamp(min=1)
            pooled = pooled / counts[:, None].to(tokens.dtype)
            return Features(pooled=pooled, tokens=tokens, padding=batch.padding)
        real = (~batch.padding)[..., None].to(tokens.dtype)
        pooled = (tokens * real).sum(1) / real.sum(1).clamp(min=1)
        return Features(pooled=pooled, tokens=tokens, padding=batch.padding)

    def save(self, directory: str) -> None:
        """Write ``model.safetensors`` (weights) and ``config.json`` (the ModelConfig) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(
                {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.to_json()}, f, indent=2
            )

    @classmethod
    def load(cls, directory: str, map_location: str | torch.device = "cpu") -> MaskedModel:
        """Rebuild a saved model from ``directory`` (JSON config + safetensors; nothing is unpickled)."""
        cpath, wpath = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        for p in (cpath, wpath):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing: not a saved maskloom model directory")
        try:
            with open(cpath) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{cpath}: corrupt: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
            raise ValueError(f"{cpath}: invalid: not a {FORMAT} config")
        if doc.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{cpath}: unsupported: format version {doc['version']} > {FORMAT_VERSION}")
        try:
            config = ModelConfig.from_json(doc["config"])
        except ValueError as e:
            raise ValueError(f"{cpath}: invalid: {e}") from None
        model = cls(config)
        try:
            state = load_file(wpath, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{wpath}: corrupt: {e}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{wpath}: invalid: missing weights {missing}, unexpected weights {unexpected}")
        return model.to(map_location)
