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

    def partners(self, head_dim: int) -> np.ndarray:
        """For each of a key's ``head_dim`` elements, the other element of its rotary pair
        (itself past ``dim``: partial rotary leaves those alone)."""
        perm = np.arange(head_dim, dtype=np.int64)
        dim, half = self.dim, self.dim // 2
        if self.interleaved:  # pairs (0, 1), (2, 3), ...
            perm[0:dim:2], perm[1:dim:2] = np.arange(1, dim, 2), np.arange(0, dim, 2)
        else:  # pairs (i, i + dim/2)
            perm[:half], perm[half:dim] = np.arange(half, dim), np.arange(half)
        return perm

    def tables(self, layer: int, distances: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``C`` and ``S`` [positions, head_dim] such that ``keys * C + keys[..., partners] * S``
        moves each position's key ``distances`` positions towards the start (rotated by
        ``-distance`` times each pair's frequency; ``C`` = 1 and ``S`` = 0 past ``dim``)."""
        angles = -np.asarray(distances, dtype=np.float64)[:, None] * self.layer_freqs[layer][None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        dim, half = self.dim, self.dim // 2
        c = np.ones((len(angles), head_dim), dtype=np.float32)
        s = np.zeros((len(angles), head_dim), dtype=np.float32)
        if self.interleaved:
            c[:, 0:dim:2], c[:, 1:dim:2] = cos, cos
            s[:, 0:dim:2], s[:, 1:dim:2] = -sin, sin
        else:
            c[:, :half], c[:, half:dim] = cos, cos
            s[:, :half], s[:, half:dim] = -sin, sin
        return c, s

    def rotate(self, layer: int, keys: np.ndarray, distance: int) -> np.ndarray:
        """``keys`` [..., positions, head_dim] moved ``distance`` positions towards the start; a
        new array (fp16 caches are rotated in fp32). The same tables as the device shift
        (``shift_graph``), so both give the same bits."""
        keys = np.asarray(keys, dtype=np.float32)
        head_dim = keys.shape[-1]
        c, s = self.tables(layer, np.array([distance]), head_dim)
        return keys * c[0] + keys[..., self.partners(head_dim)] * s[0]
