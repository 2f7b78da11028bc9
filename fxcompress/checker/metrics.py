"""Error metrics between a model's outputs and an artifact's, as flat float64 arrays."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


def outputs_to_numpy(x: Any) -> list[np.ndarray]:
    """A model's (possibly nested) outputs as a flat list of arrays, in ONNX output order.

    Example:
        >>> [a.shape for a in outputs_to_numpy((torch.zeros(2, 3), [torch.zeros(4)]))]
        [(2, 3), (4,)]
    """
    flat, _ = torch.utils._pytree.tree_flatten(x)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flat]


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
    """Error metrics of ``candidate`` against ``reference`` (lists of same-shape arrays, batch on axis 0).

    ``cosine`` is the mean per-sample cosine similarity, ``cosine_min`` the worst sample; ``max_rel`` is the
    max abs error over the max abs reference value (robust where the reference is near zero).

    Example:
        >>> round(compare([np.ones((2, 3))], [np.ones((2, 3))])["cosine"], 12)
        1.0
    """
    ref = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1) for r in reference]).astype(
        np.float64
    )
    out = np.concatenate([c.reshape(c.shape[0], -1) if c.ndim else c.reshape(1, 1) for c in candidate]).astype(
        np.float64
    )
    diff = out - ref
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(
        norms > 0, (ref * out).sum(1) / np.maximum(norms, 1e-300), np.where(np.abs(diff).max(1) == 0, 1.0, 0.0)
    )
    noise = float((diff**2).sum())
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs": float(np.abs(diff).max()),
        "max_rel": float(np.abs(diff).max() / max(np.abs(ref).max(), 1e-12)),
        "sqnr_db": 200.0 if noise == 0 else float(10 * math.log10(max(float((ref**2).sum()), 1e-300) / noise)),
    }
