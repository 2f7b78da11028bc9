"""``optimize_decoder``: a causal LM compressed as one KV-cache decoder (prefill and decode in one graph)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from fxcompress.api import CompressedModel, optimize
from fxcompress.errors import InputError
from fxcompress.llm.decoder import CacheLayout, KVCacheDecoder
from fxcompress.recipe.parse import RecipeLike

TokenBatches = Union[torch.Tensor, Iterable[torch.Tensor]]


def prompt_inputs(
    layout: CacheLayout, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """The decoder's inputs for a prompt: an empty cache, and positions counted over the unpadded tokens (left
    padding, as transformers' ``generate`` counts them).

    Example:
        >>> feeds = prompt_inputs(CacheLayout(1, 2, 8), torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))
        >>> feeds["position_ids"].tolist(), tuple(feeds["past_key_values_0_key"].shape)
        ([[1, 0, 1]], (1, 2, 0, 8))
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(
            f"token ids must be a [batch, length] integer tensor, got {tuple(input_ids.shape)} "
            f"{str(input_ids.dtype).replace('torch.', '')}"
        )
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    feeds = {"input_ids": input_ids.to(torch.long), "attention_mask": mask, "position_ids": positions}
    feeds.update(zip(layout.past_names(), layout.empty_cache(input_ids.shape[0])))
    return feeds


def calibration_prompts(layout: CacheLayout, tokens: TokenBatches) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for the passes: each ``[batch, length]`` (or ``[length]``) token tensor as a prompt.

    Example:
        >>> len(calibration_prompts(CacheLayout(1, 2, 8), [torch.arange(16).view(2, 8)] * 3))
        3
    """
    batches = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    out = []
    for i, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"calibration batch {i} is a {type(ids).__name__}; give token id tensors")
        out.append(prompt_inputs(layout, ids.unsqueeze(0) if ids.dim() == 1 else ids))
    return out


def optimize_decoder(
    model: nn.Module,
    recipe: Optional[RecipeLike] = "int8",
    *,
    calibration: Optional[TokenBatches] = None,
    progress: Optional[bool] = None,
) -> CompressedModel:
    """Compress a transformers causal LM into a decoder with a KV cache.

    The result takes ``input_ids, attention_mask, position_ids`` and ``past_key_values_<i>_key/value`` per layer
    (``[batch, kv_heads, past, head_dim]``) and returns ``logits`` and ``present_<i>_key/value``; its export has
    symbolic batch, sequence and cache lengths, so one ONNX file serves the prompt (an empty cache) and each new token
    (:class:`fxcompress.llm.generate.OrtDecoder` runs it). The model is never modified.

    Args:
        model: a causal LM from transformers (Llama, Qwen2/3, Phi-3, GPT-2, ... families).
        recipe: as for :func:`fxcompress.optimize` (``None``: the float decoder, a baseline).
        calibration: token ids (``[batch, length]`` tensors, or one) that passes fitting activations (GPTQ, AWQ,
            int8_static) see as prompts; default: the tracing example, which is random.
        progress: a progress bar on stderr.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
        >>> cm = optimize_decoder(lm, "int8")
        >>> round(cm.compression_ratio, 1), cm.output_names[:2]
        (3.7, ('logits', 'present_0_key'))
    """
    decoder = KVCacheDecoder(model)
    layout = decoder.layout
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    calib = calibration_prompts(layout, calibration) if calibration is not None else None
    compressed = optimize(
        decoder,
        layout.example(vocab=vocab),
        recipe,
        calibration=calib,
        progress=progress,
        dynamic_axes=layout.dynamic_axes(),
    )
    compressed.output_names = tuple(layout.output_names())
    compressed.axis_names = _axis_names(layout)
    compressed.metadata["decoder"] = decoder_metadata(model, layout)
    return compressed


def _axis_names(layout: CacheLayout) -> dict[str, dict[int, str]]:
    names: dict[str, dict[int, str]] = {
        "input_ids": {1: "sequence"},
        "position_ids": {1: "sequence"},
        "attention_mask": {1: "total_sequence"},
    }
    names.update({name: {2: "past_sequence"} for name in layout.past_names()})
    return names


def decoder_metadata(model: nn.Module, layout: CacheLayout) -> dict[str, Any]:
    """What a generation loop needs to know of the artifact, stored in its metadata.

    Example:
        >>> decoder_metadata(nn.Linear(1, 1), CacheLayout(2, 2, 16))["layers"]
        2
    """
    config = getattr(model, "config", None)
    return {
        "layers": layout.layers,
        "kv_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "cache_dtype": str(layout.dtype).replace("torch.", ""),
        "model_type": getattr(config, "model_type", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
