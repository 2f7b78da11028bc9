"""Error metrics between a model's outputs and an artifact's, as flat float64 arrays.

Non-finite values never raise: :func:`compare` counts them and leaves the metrics they would poison as None, and the
gates fail the artifact on them (:mod:`fxcompress.checker.gates`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

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


def _rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1) for a in arrays]).astype(np.float64)


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Optional[float]]:
    """Error metrics of ``candidate`` against ``reference`` (lists of same-shape arrays, batch on axis 0).

    ``cosine`` is the mean per-sample cosine similarity, ``cosine_min`` the worst sample; ``sqnr_db`` the reference's
    energy over the error's; ``max_rel`` the max abs error over the max abs reference value (robust where the
    reference is near zero); ``gain`` the least-squares scale <candidate, reference> / <reference, reference> (1 when
    the candidate is not systematically larger or smaller); ``nonfinite`` / ``reference_nonfinite`` count NaN and inf
    values, and the metrics they would poison are None.

    Example:
        >>> m = compare([np.ones((2, 3))], [2 * np.ones((2, 3))])
        >>> round(m["cosine"], 6), m["gain"], round(m["sqnr_db"], 1)
        (1.0, 2.0, 0.0)
        >>> compare([np.ones((1, 2))], [np.array([[1.0, np.nan]])])["cosine"] is None
        True
    """
    ref, out = _rows(reference), _rows(candidate)
    bad_out, bad_ref = int((~np.isfinite(out)).sum()), int((~np.isfinite(ref)).sum())
    counts: dict[str, Optional[float]] = {"nonfinite": bad_out, "reference_nonfinite": bad_ref}
    if bad_out or bad_ref:
        return {
            "cosine": None,
            "cosine_min": None,
            "max_abs": None,
            "max_rel": None,
            "sqnr_db": None,
            "gain": None,
            **counts,
        }
    diff = out - ref
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(
        norms > 0, (ref * out).sum(1) / np.maximum(norms, 1e-300), np.where(np.abs(diff).max(1) == 0, 1.0, 0.0)
    )
    noise, signal = float((diff**2).sum()), float((ref**2).sum())
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs": float(np.abs(diff).max()),
        "max_rel": float(np.abs(diff).max() / max(np.abs(ref).max(), 1e-12)),
        "sqnr_db": 200.0 if noise == 0 else float(10 * math.log10(max(signal, 1e-300) / noise)),
        "gain": float((out * ref).sum() / signal) if signal > 0 else (1.0 if noise == 0 else 0.0),
        **counts,
    }
