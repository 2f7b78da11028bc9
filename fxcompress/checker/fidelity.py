"""Does the artifact hold the weights the compression produced? Tensor by tensor, against the compressed module.

The exporter names each initializer after the module tensor it comes from, so the compressed module, lowered for the
artifact's target, says exactly what every compressed weight, scale, zero point and bias must be. A file edited after
export (a scale multiplied by 1.1, one element zeroed, a factor rescaled) is then caught exactly, and the failure
names the tensor, where output metrics would need the error to be larger than the quantization's own to see it.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

import numpy as np
import onnx
from onnx import numpy_helper
from torch import fx

from fxcompress.checker.gates import Gate
from fxcompress.export.lowering import lower_for_target
from fxcompress.export.targets import get_target


def compressed_module(compressed: Any) -> Optional[fx.GraphModule]:
    """The GraphModule of ``compressed`` (a :class:`~fxcompress.CompressedModel` or a GraphModule), else None.

    Example:
        >>> isinstance(compressed_module(fxcompress.optimize(model, x, recipe="int8")), fx.GraphModule)
        True
    """
    module = getattr(compressed, "module", compressed)
    return module if isinstance(module, fx.GraphModule) else None


def weight_gate(proto: onnx.ModelProto, compressed: Any, target_name: Optional[str], base_dir: str = ".") -> Gate:
    """One gate: every initializer named after a tensor of the compressed module, lowered for ``target_name``, holds
    exactly that tensor.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> gate = weight_gate(onnx.load(cm.export("model.onnx", target="cpu")), cm, "cpu")
        >>> gate.passed, gate.value
        (True, 0.0)
    """
    module = compressed_module(compressed)
    if module is None:
        return Gate(
            "weights",
            None,
            "same tensors as the compression's",
            False,
            None,
            f"weights: cannot compare, {type(compressed).__name__} is not a compressed module",
        )
    try:
        target = get_target(target_name or "cpu")
    except Exception:
        return Gate(
            "weights",
            None,
            "same tensors as the compression's",
            False,
            None,
            f"weights: the artifact names an unknown export target {target_name!r}",
        )
    lowered = lower_for_target(module, target)
    expected = {name: t.detach().cpu().numpy() for name, t in [*lowered.named_buffers(), *lowered.named_parameters()]}
    compared, differing = 0, []
    for init in proto.graph.initializer:
        if init.name not in expected:
            continue
        compared += 1
        want = expected[init.name]
        try:
            have = numpy_helper.to_array(init, base_dir)
        except Exception as exc:  # e.g. external data that is missing
            differing.append(f"{init.name} (unreadable: {str(exc).splitlines()[0][:80]})")
            continue
        if have.dtype != want.dtype or have.shape != want.shape:
            differing.append(
                f"{init.name} ({have.dtype}{list(have.shape)} where the compression made "
                f"{want.dtype}{list(want.shape)})"
            )
        elif not np.array_equal(have, want, equal_nan=True):
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            where = int(np.argmax(np.nan_to_num(diff, nan=np.inf)))
            differing.append(
                f"{init.name} ({int((diff != 0).sum())} of {have.size} values differ, first at flat index "
                f"{where}: {have.reshape(-1)[where].item()!r} where the compression made "
                f"{want.reshape(-1)[where].item()!r})"
            )
    del lowered, expected
    gc.collect()  # the lowered copy's re-encoded tensors sit in fx's reference cycles: free them before going on
    floor = f"0 of {compared} compressed tensors differ"
    if compared == 0:
        return Gate(
            "weights",
            None,
            floor,
            False,
            None,
            "weights: no initializer of the artifact is a tensor of the "
            "compressed module: it was not exported from it, or its tensors were renamed",
        )
    if differing:
        shown = "; ".join(differing[:5]) + (f"; and {len(differing) - 5} more" if len(differing) > 5 else "")
        return Gate(
            "weights",
            float(len(differing)),
            floor,
            False,
            None,
            f"weights: {len(differing)} tensor(s) differ from what the compression produced (the file was "
            f"changed after export, or exported from another model): {shown}",
        )
    return Gate("weights", 0.0, floor, True, None)
