"""Stage 3 of the data path: export targets, the lowering of compressed ops for a target's kernels, and the ONNX
writer."""
