"""Causal LMs as KV-cache decoders: one ONNX graph for the prompt and every new token, run by the library's greedy
loop on ONNX Runtime, must give the tokens transformers' ``generate`` gives; compressed artifacts pass the decoder
check, and a broken one fails it."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fxcompress.errors import InputError
from fxcompress.llm.check import check_decoder, perplexity
from fxcompress.llm.compress import optimize_decoder, prompt_inputs
from fxcompress.llm.decoder import CacheLayout
from fxcompress.llm.generate import OrtDecoder, greedy, torch_step
from fxcompress.models.architectures import CAUSAL_LM_FAMILIES, causal_lm
from tests.helpers import init_dtypes, op_types


def _prompts(vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded by two tokens: positions and the mask must both be right."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_float_decoder_generates_what_torch_generates(family, tmp_path):
    model = causal_lm(family)
    for p in model.parameters():  # random weights at 0.02 generate one repeated token: widen them to vary
        p.data.mul_(4.0)
    path = optimize_decoder(model, None).export(tmp_path / "decoder.onnx")
    ids, mask = _prompts()
    report = check_decoder(model, path, ids, attention_mask=mask, max_new_tokens=12)
    assert report.passed, report.summary()
    assert report.token_agreement == 1.0 and report.tokens_onnx == report.tokens_torch
    assert len(set(report.tokens_torch[1])) > 1  # a real continuation, not one token repeated
    assert report.logits_cosine > 0.99999
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values_0_key", "past_key_values_0_value"]


def test_one_graph_serves_prompt_and_decode_with_symbolic_lengths(tmp_path):
    model = causal_lm("llama")
    path = optimize_decoder(model, None).export(tmp_path / "decoder.onnx")
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values_1_value"] == ["batch", 2, "past_sequence", 16]
    assert [o.name for o in graph.output][:3] == ["logits", "present_0_key", "present_0_value"]
    decoder = OrtDecoder(path, provider="cpu")
    feeds = prompt_inputs(decoder.layout, torch.tensor([[5, 6, 7, 8]]))
    logits, present = decoder.step(feeds)  # an empty cache
    assert tuple(present[0].shape) == (1, 2, 4, 16)
    with torch.no_grad():
        want = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.allclose(logits, want, atol=1e-4)


def test_int8_decoder_passes_and_its_torch_module_decodes_like_the_artifact(tmp_path):
    model = causal_lm("llama")
    compressed = optimize_decoder(model, "int8")
    path = compressed.export(tmp_path / "decoder.onnx")
    assert {"DynamicQuantizeMatMul", "MatMulInteger"} & set(op_types(path))
    dtypes = list(init_dtypes(path).values())
    assert dtypes.count("int8") + dtypes.count("uint8") >= 15  # 7 Linears per layer, the embedding, the head
    ids, mask = _prompts()
    report = check_decoder(model, path, ids, attention_mask=mask, max_new_tokens=8, text=torch.arange(3, 120))
    assert report.passed, report.summary()
    assert report.perplexity_increase is not None and abs(report.perplexity_increase) < 0.01
    decoder = OrtDecoder(path, provider="cpu")
    in_torch = greedy(torch_step(compressed.module, compressed.input_names), decoder.layout, ids, 8, mask)
    assert in_torch.shape == (2, 8)
    assert (in_torch == decoder.generate(ids, 8, attention_mask=mask)).float().mean() >= 0.75


def test_int4_decoder_uses_matmulnbits_and_passes(tmp_path):
    model = causal_lm("qwen2", hidden=128, intermediate=256)
    path = optimize_decoder(model, "int4:block=32").export(tmp_path / "decoder.onnx", target="cpu-nbits")
    assert "MatMulNBits" in op_types(path)
    report = check_decoder(model, path, _prompts()[0], max_new_tokens=4)
    assert report.passed, report.summary()
    assert not report.tokens_onnx == [] and report.provider == "CPUExecutionProvider"


@pytest.mark.slow
@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_fp16_decoder_of_every_family_stores_half_weights_and_decodes_like_torch(family, tmp_path):
    model = causal_lm(family)
    for p in model.parameters():  # as above: weights that generate varied tokens
        p.data.mul_(4.0)
    path = optimize_decoder(model, "fp16").export(tmp_path / "decoder.onnx")
    dtypes = init_dtypes(path)
    big = [name for name, t in _initializers(path).items() if t.size >= 1024]
    assert big and all(dtypes[name] == "float16" for name in big), {n: dtypes[n] for n in big}
    ids, mask = _prompts()
    report = check_decoder(model, path, ids, attention_mask=mask, max_new_tokens=8)
    assert report.passed, report.summary()
    assert report.logits_cosine > 0.999 and report.token_agreement >= 0.9


def _initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_a_decoder_with_a_corrupted_scale_fails_the_check(tmp_path):
    model = causal_lm("llama")
    path = optimize_decoder(model, "int8").export(tmp_path / "decoder.onnx")
    proto = onnx.load(str(path))
    hit = [t for t in proto.graph.initializer if "scale" in t.name and "mlp" in t.name and t.dims]
    assert hit, [t.name for t in proto.graph.initializer]
    for t in hit:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 20.0, t.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    report = check_decoder(model, broken, _prompts()[0], max_new_tokens=4)
    assert not report.passed
    assert "logits cosine" in report.failures[0]


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    assert perplexity(torch.zeros(2, 5, 8), torch.zeros(2, 5, dtype=torch.long)) == pytest.approx(8.0)


def test_what_is_not_a_causal_lm_is_refused_with_the_reason(tmp_path):
    with pytest.raises(InputError, match="not a transformers causal LM"):
        optimize_decoder(nn.Linear(4, 4))
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(InputError, match="encoder-decoder"):
        optimize_decoder(t5)
    plain = tmp_path / "plain.onnx"
    import fxcompress

    fxcompress.optimize(nn.Linear(4, 4), torch.randn(2, 4), recipe=None).export(plain)
    with pytest.raises(InputError, match="not a KV-cache decoder"):
        OrtDecoder(plain)
    with pytest.raises(InputError, match="integer tensor"):
        prompt_inputs(CacheLayout(1, 2, 8), torch.randn(1, 4))
