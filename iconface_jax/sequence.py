"""The hybrid token sequence (docs/design.md#hybrid-sequence): RoPE ids of text, scene, degraded and reference segments.

Image segments share the (h, w) grid and differ in the t axis (scene 0, degraded 2, reference r at
10 + r by default); text tokens count along the l axis. With no references the segment is absent.
"""
from __future__ import annotations

import numpy as np


def text_ids(length: int) -> np.ndarray:
    """(length, 4) ids (0, 0, 0, l)."""
    ids = np.zeros((length, 4), np.int32)
    ids[:, 3] = np.arange(length)
    return ids


def image_ids(t: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, 4) ids (t, h, w, 0) in row-major token order."""
    h, w = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.stack([np.full(h.size, t), h.ravel(), w.ravel(), np.zeros(h.size)], -1).astype(np.int32)


def image_segment_ids(grid_h: int, grid_w: int, num_refs: int, t_scene: int = 0, t_degraded: int = 2,
                      t_reference: int = 10) -> np.ndarray:
    """Ids of [scene; degraded; reference 0..R-1], each grid_h * grid_w tokens."""
    ts = [t_scene, t_degraded] + [t_reference + r for r in range(num_refs)]
    return np.concatenate([image_ids(t, grid_h, grid_w) for t in ts])
