"""Models called with keyword arguments (every Hugging Face model) are given their inputs as they are called."""

import onnx
import pytest
import torch
from helpers import cosine
from torch import nn

import fxcompress
from fxcompress.checker.parity import check
from fxcompress.errors import InputError
from fxcompress.graph.calibration import Calibration


class KeywordEncoder(nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None) like a Hugging Face encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.types = nn.Embedding(2, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.embed(input_ids)
        if token_type_ids is not None:
            h = h + self.types(token_type_ids)
        h = torch.relu(self.fc(h))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


def _batch(seed: int, skip_mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, 50, (4, 6), generator=g)}
    if not skip_mask:
        batch["attention_mask"] = torch.ones(4, 6)
    batch["token_type_ids"] = torch.randint(0, 2, (4, 6), generator=g)
    return batch


def test_keyword_inputs_skipping_a_parameter_reach_onnx_by_name(tmp_path):
    torch.manual_seed(0)
    model = KeywordEncoder().eval()
    example = _batch(0, skip_mask=True)  # token_type_ids given, attention_mask left at its default
    cm = fxcompress.optimize(model, example, recipe="int8", calibration=[_batch(1, True), _batch(2, True)])
    assert cm.input_names == ("input_ids", "token_type_ids")
    torch.testing.assert_close(cm(**example), model(**example), atol=0.05, rtol=0.05)
    path = cm.export(tmp_path / "kw.onnx", target="cpu")
    assert [i.name for i in onnx.load(str(path), load_external_data=False).graph.input] == [
        "input_ids",
        "token_type_ids",
    ]
    report = check(model, path, example, compressed=cm)
    assert report.passed, report.failures
    assert type(model) is KeywordEncoder  # the bound copy is a subclass; the user's model keeps its class


def test_calibration_dicts_with_a_named_token_mask():
    torch.manual_seed(0)
    model = KeywordEncoder().eval()
    calib = Calibration([_batch(i) for i in range(3)], token_mask="attention_mask")
    cm = fxcompress.optimize(model, _batch(0), recipe="int8_static", calibration=calib)
    assert any(r.action != "skipped" for r in cm.records)


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([{"input_ids": torch.zeros(4, 6, dtype=torch.long)}], "do not match the example's"),
        ([(torch.zeros(4, 6, dtype=torch.long),)], "give every batch as a dict"),
        (Calibration([_batch(1)], token_mask="mask"), "token_mask='mask' names no keyword input"),
    ],
)
def test_mismatched_keyword_batches_are_refused(calibration, message):
    with pytest.raises(InputError, match=message):
        fxcompress.optimize(KeywordEncoder().eval(), _batch(0), recipe="int8", calibration=calibration)


def test_keywords_must_be_identifiers():
    with pytest.raises(InputError, match="must be Python identifiers"):
        fxcompress.optimize(KeywordEncoder().eval(), {"input ids": torch.zeros(1, 6, dtype=torch.long)})


@pytest.mark.parametrize("recipe", ["fp16", "int8"])
def test_a_causal_lm_called_with_keywords(recipe):
    """transformers decoders (Llama, GPT-2 layouts) take input_ids/attention_mask as keywords; fp16 used to fail on
    them with a dtype mismatch."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    for model in (
        LlamaForCausalLM(llama),
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=500, n_positions=64)),
    ):
        model.config.use_cache = False
        model.eval()
        ids = torch.randint(0, 500, (2, 16))
        example = {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        cm = fxcompress.optimize(model, example, recipe=recipe)
        got = cm(**example)
        got = got.logits if hasattr(got, "logits") else got[0]
        assert cosine(got, model(**example).logits) > 0.999
        with pytest.raises(fxcompress.errors.InputError, match="unexpected keyword"):
            cm(input_ids=ids, mask=ids)
