"""ONNX Runtime's ``com.microsoft`` contrib ops as onnxscript and onnx.checker see them.

onnx does not know ORT's contrib ops; onnxscript and ``onnx.checker`` need their schemas to build and validate a graph
that uses them. Each schema lists its inputs as (name, type variable, optional) and its attributes as (name, required)
or (name, required, "float") (default: an int), following ORT's contrib op documentation.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema

ONNX_OPSET = 21
MSFT = onnxscript.values.Opset("com.microsoft", 1)

_CONTRIB_SCHEMAS = {
    "DynamicQuantizeMatMul": dict(
        inputs=[
            ("A", "T1", False),
            ("B", "T2", False),
            ("b_scale", "T1", False),
            ("b_zero_point", "T2", True),
            ("bias", "T1", True),
        ],
        types=[("T1", ["tensor(float)"]), ("T2", ["tensor(int8)", "tensor(uint8)"])],
        attributes=[],
    ),
    "MatMulNBits": dict(
        inputs=[
            ("A", "T1", False),
            ("B", "T2", False),
            ("scales", "T1", False),
            ("zero_points", "T3", True),
            ("g_idx", "T4", True),
            ("bias", "T1", True),
        ],
        types=[
            ("T1", ["tensor(float)", "tensor(float16)"]),
            ("T2", ["tensor(uint8)", "tensor(int32)"]),
            ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"]),
            ("T4", ["tensor(int32)"]),
        ],
        attributes=[("K", True), ("N", True), ("bits", True), ("block_size", True), ("accuracy_level", False)],
    ),
    "GatherBlockQuantized": dict(
        inputs=[
            ("data", "T1", False),
            ("indices", "Tind", False),
            ("scales", "T2", False),
            ("zero_points", "T1", True),
        ],
        types=[
            ("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"]),
            ("Tind", ["tensor(int32)", "tensor(int64)"]),
            ("T2", ["tensor(float)", "tensor(float16)"]),
        ],
        attributes=[("gather_axis", False), ("quantize_axis", False), ("block_size", False), ("bits", False)],
        output="T2",
    ),
    # Only the inputs fxcompress writes (ORT's op also takes past key/value and a cache indirection).
    "MultiHeadAttention": dict(
        inputs=[
            ("query", "T", False),
            ("key", "T", True),
            ("value", "T", True),
            ("bias", "T", True),
            ("key_padding_mask", "M", True),
            ("attention_bias", "T", True),
        ],
        types=[("T", ["tensor(float)", "tensor(float16)"]), ("M", ["tensor(int32)"])],
        attributes=[("num_heads", True), ("scale", False, "float"), ("mask_filter_value", False, "float")],
        output="T",
    ),
}


_ATTRIBUTE_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}


def _register_contrib_schemas() -> None:
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    for name, spec in _CONTRIB_SCHEMAS.items():
        if onnx.defs.has(name, "com.microsoft"):
            continue
        onnx.defs.register_schema(
            OpSchema(
                name,
                "com.microsoft",
                1,
                inputs=[param(n, t, param_option=optional) if opt else param(n, t) for n, t, opt in spec["inputs"]],
                outputs=[param("Y", spec.get("output", "T1"))],
                type_constraints=[(t, allowed, "") for t, allowed in spec["types"]],
                attributes=[
                    OpSchema.Attribute(a, _ATTRIBUTE_TYPES[kind[0] if kind else "int"], "", required=req)
                    for a, req, *kind in spec["attributes"]
                ],
            )
        )


_register_contrib_schemas()
