"""How a graph rotated its cached keys, and rotating them again by a distance.

The attention operator applies rotary position embeddings before it stores a key, so the KV
cache holds rotated keys. Moving a cached key ``d`` positions towards the start is rotating each
of its pairs by ``-d`` times that pair's frequency; values carry no position. The manifest our
importer writes says, per layer, which frequencies were used (rotary scaling, partial rotary and
sliding layers' own base included) and how the pairs are laid out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RotaryLayout:
    """How each layer's cached keys were rotated: the manifest's ``rotary`` section."""

    dim: int
    interleaved: bool
    #: Per layer, the frequency of each rotary pair (``dim / 2`` of them), scaling applied.
    layer_freqs: tuple[np.ndarray, ...]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "RotaryLayout | None":
        rotary = manifest.get("rotary")
        if not rotary or not rotary.get("layers"):
            return None
        tables = {name: np.asarray(freqs, dtype=np.float64) for name, freqs in rotary["inv_freq"].items()}
        return cls(int(rotary["dim"]), bool(rotary["interleaved"]),
                   tuple(tables[name] for name in rotary["layers"]))

    def rotate(self, layer: int, keys: np.ndarray, distance: int) -> np.ndarray:
        """``keys`` [..., positions, head_dim] moved ``distance`` positions towards the start
        (rotated by ``-distance`` times each pair's frequency); a new array."""
        angles = -float(distance) * self.layer_freqs[layer]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        half = self.dim // 2
        keys = np.asarray(keys, dtype=np.float32)  # fp16 caches are rotated in fp32
        out = np.array(keys, copy=True)
        if self.interleaved:  # pairs (0, 1), (2, 3), ...
            first, second = keys[..., 0:self.dim:2], keys[..., 1:self.dim:2]
            out[..., 0:self.dim:2] = first * cos - second * sin
            out[..., 1:self.dim:2] = second * cos + first * sin
        else:  # pairs (i, i + dim/2)
            first, second = keys[..., :half], keys[..., half:self.dim]
            out[..., :half] = first * cos - second * sin
            out[..., half:self.dim] = second * cos + first * sin
        return out
