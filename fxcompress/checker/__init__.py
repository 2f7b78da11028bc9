"""Stage 4 of the data path: run an artifact on ONNX Runtime and hold it against the original model."""
