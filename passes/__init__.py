"""Built-in rewrite passes, one technique per module; importing this package registers them."""

from fxcompress.passes import fold_bn, int4, quantize  # noqa: F401

__all__ = ["fold_bn", "int4", "quantize"]
