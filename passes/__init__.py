"""Built-in rewrite passes, one technique per module; importing this package registers them."""

from fxcompress.passes import fold_bn, half, int4, quantize, static_quant  # noqa: F401

__all__ = ["fold_bn", "half", "int4", "quantize", "static_quant"]
