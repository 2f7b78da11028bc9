"""Where parity breaks: the artifact's output at every compressed layer on ONNX Runtime against the original model's.

A failing report says "cosine 0.93 < 0.99" for the model's output; this names the layer. Each compressed op in the
artifact carries the torch module path it was exported from (the exporter's ``name_scopes`` metadata), so the value
it produces is exposed as an extra graph output, the original model runs with a hook on that module, and the two are
compared on the same inputs, in graph order. Errors compound along the graph, so a layer is a suspect when its error
jumps well past the error already present at the compressed layer before it (``jump_db``), not merely when its error
is large: a corrupted scale, an activation saturated by a U8S8 kernel on a CPU without VNNI, or an ORT fusion that
changed numerics each show as one such jump at the layer that caused it.

Exposing intermediate values as outputs stops ONNX Runtime from fusing across them, so the numbers describe a
graph a little less fused than the deployed one.
"""

from __future__ import annotations

import ast
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from fxcompress.checker.runtime import import_ort
from fxcompress.errors import InputError
from fxcompress.graph.inputs import called_positionally, normalize_inputs, run_reference
from fxcompress.text import table

_COMPRESSED_OP = "torch.ops.fxcompress."
_ACTIVATION_OP = "torch.ops.fxcompress.activation_qdq"
_MAX_PROTO_BYTES = 1 << 30  # outputs are added to an in-memory copy: protobuf's own limit is 2 GiB


@dataclass
class LayerDivergence:
    """One compressed layer: its output on ONNX Runtime against the original model's, and how much error it adds."""

    layer: str
    value: str
    op: str
    sqnr_db: float  # signal-to-error ratio of the layer's output vs the original model's (higher is better)
    cosine: float
    added_db: float  # how far sqnr_db fell below the previous compressed layer's (positive: error added here)
    suspect: bool = False


@dataclass
class Localization:
    """Per-layer divergence in graph order; ``suspects`` are the layers where the error jumps, worst jump first."""

    layers: list[LayerDivergence]
    unmatched: list[str] = field(default_factory=list)  # compressed ops with no module to compare against

    @property
    def suspects(self) -> list[LayerDivergence]:
        """The flagged layers, the largest jump first.

        Example:
            >>> loc = Localization([LayerDivergence("fc1", "v1", "MatMul", 40.0, 1.0, 0.0),
            ...                     LayerDivergence("fc2", "v2", "MatMul", 3.0, 0.7, 37.0, suspect=True)])
            >>> [s.layer for s in loc.suspects]
            ['fc2']
        """
        return sorted((r for r in self.layers if r.suspect), key=lambda r: -r.added_db)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``fxcompress check --localize --json`` stores under ``localization``)."""
        return {
            "layers": [asdict(r) for r in self.layers],
            "suspects": [r.layer for r in self.suspects],
            "unmatched": self.unmatched,
        }

    def to_text(self) -> str:
        """The per-layer table, then the verdict.

        Example:
            >>> print(Localization([LayerDivergence("fc1", "v1", "MatMul", 40.0, 1.0, 0.0)]).to_text())
            ... # doctest: +ELLIPSIS
            layer  ONNX op  SQNR dB  cosine   added dB  suspect
            ...
            no layer adds a jump in error: the output error builds up gradually over the compressed layers
        """
        rows = [
            [r.layer, r.op, f"{r.sqnr_db:.1f}", f"{r.cosine:.5f}", f"{r.added_db:+.1f}", "<-" if r.suspect else ""]
            for r in self.layers
        ]
        out = [table(rows, ["layer", "ONNX op", "SQNR dB", "cosine", "added dB", "suspect"])]
        if self.suspects:
            first = next(r for r in self.layers if r.suspect)
            out.append(
                f"parity breaks first at {first.layer} ({first.op}): its output error jumps by {first.added_db:.1f} "
                f"dB to SQNR {first.sqnr_db:.1f} dB; suspects, worst first: {', '.join(s.layer for s in self.suspects)}"
            )
        else:
            out.append("no layer adds a jump in error: the output error builds up gradually over the compressed layers")
        if self.unmatched:
            out.append(f"not compared (no module of that name in the model): {', '.join(self.unmatched[:5])}")
        return "\n".join(out)


def compressed_values(proto: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(module path, ONNX value, ONNX op) of each compressed layer's output, in graph order: the value named after
    the fxcompress op's torch node, produced by the last ONNX node its translation emitted.

    Example:
        >>> compressed_values(onnx.load("model.onnx"))  # the int8 artifact of a 2-Linear MLP
        [('0', 'linear_q8', 'DynamicQuantizeMatMul'), ('2', 'linear_q8_1', 'DynamicQuantizeMatMul')]
    """
    found: dict[str, tuple[str, str, str]] = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        fx_node = meta.get("pkg.torch.onnx.fx_node", "")
        if _COMPRESSED_OP not in fx_node or not fx_node.startswith("%") or _ACTIVATION_OP in fx_node:
            continue  # an activation rounded between layers is not a layer
        name = fx_node[1:].split(" ", 1)[0]
        if name not in node.output:
            continue
        scopes = _scopes(meta.get("pkg.torch.onnx.name_scopes", ""))
        layer = scopes[-2] if len(scopes) > 1 else name
        found[name] = (layer, name, node.op_type)
    return list(found.values())


def _scopes(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in value] if isinstance(value, (list, tuple)) else []


def localize(
    model: torch.nn.Module,
    onnx_path: str | Path,
    example_inputs: Any,
    *,
    provider: str = "cpu",
    jump_db: float = 10.0,
    ceiling_db: float = 30.0,
) -> Localization:
    """Compare the artifact's output at each compressed layer with ``model``'s (the original, in eval mode).

    A layer is a suspect when its SQNR falls more than ``jump_db`` below the previous compressed layer's, that
    being capped at ``ceiling_db`` (the first layer is compared with the ceiling): one int8 layer costs a few dB, an
    int4 layer lands near 20-25 dB, so neither is flagged after clean int8 layers, while a wrong scale or a saturated
    activation drops a layer to 0-15 dB.

    Example:
        >>> loc = localize(model, "model.onnx", x)
        >>> [r.layer for r in loc.layers], loc.suspects
        (['0', '2'], [])
    """
    proto = onnx.load(str(onnx_path))
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise InputError(
            f"{onnx_path}: localisation copies the artifact with extra outputs in memory and handles models under "
            f"{_MAX_PROTO_BYTES >> 30} GiB; check a smaller configuration of the model"
        )
    sites = compressed_values(proto)
    if not sites:
        raise InputError(
            f"{onnx_path} has no fxcompress-compressed op with its torch node recorded: nothing to localise "
            "(was it exported by fxcompress from a compressed model?)"
        )
    initializers = {t.name for t in proto.graph.initializer}
    names = [p.name for p in proto.graph.input if p.name not in initializers]
    keywords = list(example_inputs) if isinstance(example_inputs, dict) else None
    inputs = normalize_inputs(example_inputs, keywords)
    feed = dict(zip(keywords or names, (t.numpy() for t in inputs)))
    modules = dict(model.named_modules())
    matched = [s for s in sites if s[0] in modules]
    called = called_positionally(model, keywords) if keywords else model
    reference = _module_outputs(called, modules, inputs, [s[0] for s in matched])
    got = _run_with_outputs(proto, [s[1] for s in matched], {k: v for k, v in feed.items() if k in names}, provider)
    layers: list[LayerDivergence] = []
    previous = ceiling_db  # the first layer is held to the ceiling: a layer of its own costs less than that
    for (layer, value, op), actual in zip(matched, got):
        want = reference.get(layer)
        if want is None or want.size != actual.size:
            continue
        if actual.min() >= 0 > want.min():  # the artifact's layer ends in a fused ReLU (int8_static rounds its
            want, op = np.maximum(want, 0), op + " (+ReLU)"  # output on the ReLU's range): compare after it
        sqnr, cos = _sqnr_db(want, actual), _cosine(want, actual)
        added = min(previous, ceiling_db) - sqnr
        layers.append(LayerDivergence(layer, value, op, sqnr, cos, added, suspect=added > jump_db))
        previous = sqnr
    unmatched = [s[0] for s in sites if s[0] not in modules]
    return Localization(layers, unmatched)


def _module_outputs(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module], inputs: tuple, layers: list[str]
) -> dict[str, np.ndarray]:
    """The first tensor each named module returns when ``model`` runs ``inputs`` (the last call, for a module called
    more than once)."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name in set(layers):

        def hook(_module, _args, output, name=name):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(t, torch.Tensor):
                captured[name] = t.detach().float().numpy().copy()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        run_reference(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _run_with_outputs(
    proto: onnx.ModelProto, values: list[str], feed: dict[str, np.ndarray], provider: str
) -> list[np.ndarray]:
    ort = import_ort()
    typed = {v.name: v for v in [*proto.graph.value_info, *proto.graph.output]}
    present = {o.name for o in proto.graph.output}
    for name in values:
        if name not in present:
            proto.graph.output.append(typed.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="fxc-localize-") as tmp:
        path = Path(tmp, "exposed.onnx")
        onnx.save(proto, str(path))
        providers = ["CPUExecutionProvider"]
        if provider == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(path), providers=providers)
        outs = session.run(values, feed)
    return [np.asarray(o, dtype=np.float32) for o in outs]


def _sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    w, g = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    noise = float(np.sum((w - g) ** 2))
    signal = float(np.sum(w**2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _cosine(want: np.ndarray, got: np.ndarray) -> float:
    w, g = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    denom = float(np.linalg.norm(w) * np.linalg.norm(g))
    return float(w @ g / denom) if denom > 0 else 0.0
