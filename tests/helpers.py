"""Shared test helpers."""

from __future__ import annotations

import onnx
import torch


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def init_dtypes(path) -> dict[str, str]:
    m = onnx.load(str(path))
    return {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in m.graph.initializer}


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean().item()
