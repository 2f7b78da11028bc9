"""Models outside the zoo, built from public configs (torchvision and transformers layouts, nn.TransformerEncoder,
recurrent and audio nets) with random weights at CI size: every pass either refuses with a clear FxCompressError or
produces an artifact that ONNX Runtime runs as the compressed torch module computes, holding the bytes optimize
claimed. The faithful passes must also pass the parity checker against the original model. Any other exception (an
exporter's raw traceback) fails the test.

The default run covers ``int8`` on every architecture. ``int8_static`` and ``fp16`` on every architecture, ``int4``
where it applies and the structural passes on four of them are marked ``matrix`` (and slow): ``pytest -m matrix``
runs them (~6 min on 2 cores); the default run, and so CI, leaves them out.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.checker.metrics import outputs_to_numpy
from fxcompress.checker.parity import check
from fxcompress.errors import FxCompressError
from fxcompress.graph.inputs import normalize_inputs
from fxcompress.models import architectures as arch


def _transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(2, 10, 64),)


def _decoder(family: str):
    """A transformers causal LM at CI size, called with keywords (no KV cache: that is the decoder issue's part)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D layers (addmm over an [in, out] weight), head tied to the token embedding
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64))
    else:
        config = LlamaConfig(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
        )
        config.vocab_size = 500
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)}


MODELS = {
    "gpt2": lambda: _decoder("gpt2"),
    "llama": lambda: _decoder("llama"),
    "resnet18": lambda: arch.resnet18(image=32, width=16),
    "mobilenet_v3_small": lambda: arch.mobilenet_v3_small(image=32),
    "efficientnet_b0": lambda: arch.efficientnet_b0(image=32),
    "vit": lambda: arch.vit(image=32, patch=8, dim=64, depth=2, heads=4, mlp=128),
    "audio_net": lambda: arch.audio_net(samples=2000, width=16),
    "lstm": lambda: arch.tagger("lstm"),
    "gru": lambda: arch.tagger("gru"),
    "transformer_encoder": _transformer_encoder,
    "bert": lambda: arch.hf_encoder("bert", 1 / 6),
    "distilbert": lambda: arch.hf_encoder("distilbert", 1 / 6),
    "t5_encoder": lambda: arch.hf_encoder("t5_encoder", 1 / 8),
    "whisper_encoder": lambda: arch.hf_encoder("whisper_encoder", 1 / 8),
}
SEQUENCES = {"lstm", "gru", "transformer_encoder", "bert", "distilbert", "t5_encoder", "gpt2", "llama"}
FAITHFUL = ("int8", "int8_static", "int4", "fp16")  # close enough to the original for the checker's floors
LOSSY = ("prune:ratio=0.3", "svd", "sparse24")  # need fine-tuning to match the original: checked against cm
# Smallest compression (fp32 bytes / compressed bytes) each pass must reach; what a pass cannot touch (recurrent
# weights under int4, embeddings under int8_static, convolutions under int4) is listed, with its reason, in records.
MIN_RATIO = {"int8": 3.4, "int8_static": 3.3, "int4": 3.8, "fp16": 1.95}
MIN_RATIO_EXCEPT = {
    ("lstm", "int8"): 1.2,  # the recurrent weights stay float, one record per weight
    ("gru", "int8"): 1.2,
    ("lstm", "fp16"): 1.1,  # LSTM/GRU compute in float32
    ("gru", "fp16"): 1.1,
    ("lstm", "int8_static"): 1.0,
    ("gru", "int8_static"): 1.0,
    ("bert", "int8_static"): 1.3,  # embeddings stay float (static int8 is for Linear/Conv)
    ("distilbert", "int8_static"): 1.3,
    ("t5_encoder", "int8_static"): 1.3,
    ("whisper_encoder", "int8_static"): 2.4,
    ("gpt2", "int8"): 2.9,  # the head tied to the embedding is stored twice in int8 (gather table + GEMM copy)
    ("gpt2", "int8_static"): 2.1,  # the embedding and the head tied to it stay float
    ("llama", "int8_static"): 2.2,  # the embedding stays float
    ("bert", "int4"): 2.2,  # int4's default kinds=linear: the embeddings (large in a shrunk model) stay float
    ("distilbert", "int4"): 1.6,
    ("t5_encoder", "int4"): 1.4,
    ("whisper_encoder", "int4"): 1.5,  # and its convolutions
}
INT4_COVERS = {"vit", "transformer_encoder", "bert", "distilbert", "t5_encoder", "whisper_encoder"}


def _compress(name: str, recipe: str):
    model, example = MODELS[name]()
    axes = (0, 1) if name in SEQUENCES else (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration-size and export-fallback warnings are tested elsewhere
        cm = fxcompress.optimize(model, example, recipe=recipe, calibration=[example], dynamic_axes=axes)
    return model, example, cm


def _ort_matches_compressed_module(cm, example, path) -> float:
    import onnxruntime as ort

    inputs = normalize_inputs(example, cm.input_names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)[0].astype(np.float64).ravel()
    want = outputs_to_numpy(cm(*inputs))[0].astype(np.float64).ravel()
    return float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))


def _run(name: str, recipe: str, tmp_path) -> None:
    try:
        model, example, cm = _compress(name, recipe)
        path = cm.export(tmp_path / f"{name}.onnx")
    except FxCompressError as refused:  # a refusal must say what and where
        assert len(str(refused)) > 40, str(refused)
        return
    assert _ort_matches_compressed_module(cm, example, path) > 0.9999
    assert cm.compression_ratio >= 0.99, f"{recipe} made {name} larger: {cm.compression_ratio:.2f}x"
    word = recipe.split(":")[0]
    if word in FAITHFUL:
        least = MIN_RATIO_EXCEPT.get((name, word), MIN_RATIO[word])
        if word == "int4" and name not in INT4_COVERS:
            least = 1.0  # convolutions and recurrent weights: int4 is for Linear/Embedding
        assert cm.compression_ratio >= least, f"{name} {recipe}: {cm.compression_ratio:.2f}x < {least}x"
        report = check(model, path, example, compressed=cm, fp32_baseline=False, latency_repeat=1)
        assert report.passed, report.failures
        artifact = report.weights["ratio"]
        assert artifact <= 1.05 / cm.compression_ratio, f"the file holds {artifact:.3f} of fp32, optimize claimed less"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int8_on_every_architecture(name, tmp_path):
    _run(name, "int8", tmp_path)


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("recipe", ["int8_static", "fp16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_faithful_pass_on_every_architecture(name, recipe, tmp_path):
    _run(name, recipe, tmp_path)


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("name", sorted(INT4_COVERS | {"gpt2", "llama"}))
def test_int4_where_it_applies(name, tmp_path):
    """int4 rewrites Linear (and Embedding) layers: the models made of them (on CNNs and recurrent nets it leaves
    the convolutions and cells alone, with records, which the int8 run already covers)."""
    _run(name, "int4", tmp_path)


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("recipe", LOSSY)
@pytest.mark.parametrize("name", ["bert", "gpt2", "mobilenet_v3_small", "vit"])
def test_structural_passes_on_a_spread_of_architectures(name, recipe, tmp_path):
    """Pruning, SVD and sparsity share their graph analysis across models: a CNN, a ViT, an encoder and a decoder
    cover its paths (every model went through them when the suite was written: docs/results.md)."""
    _run(name, recipe, tmp_path)


def test_vit_attention_projections_are_sites():
    _, _, cm = _compress("vit", "int8")
    packed = [r for r in cm.records if "in_proj" in r.layer]
    assert packed and all(r.action == "int8" for r in packed)


def test_recurrent_weights_left_float_each_have_a_record():
    _, _, cm = _compress("lstm", "int8")
    recurrent = [r for r in cm.records if r.skipped and "weight_hh" in r.layer]
    assert recurrent and all("LSTM" in r.reason or "recurrent" in r.reason for r in recurrent)
