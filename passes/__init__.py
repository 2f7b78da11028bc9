"""Built-in rewrite passes, one technique per module; importing this package registers them."""

from fxcompress.passes import distill, factorize, fold_bn, half, int4, prune, quantize, sparsity, static_quant  # noqa: F401

__all__ = ["distill", "factorize", "fold_bn", "half", "int4", "prune", "quantize", "sparsity", "static_quant"]
