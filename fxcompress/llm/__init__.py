"""Decoder language models: a causal LM as one ONNX decoder with a KV cache (prefill and decode), its greedy
generation on ONNX Runtime, and the token-by-token check against torch."""
