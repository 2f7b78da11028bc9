"""Compressed ops: the torch ops compressed sites become, each with its reference, fake, gradient and ONNX
translations (:mod:`fxcompress.ops.registry`)."""
