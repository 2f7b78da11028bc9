"""A causal LM as a module of flat tensors: ``input_ids, attention_mask, position_ids`` and one key and one value
tensor per layer in, ``logits`` and the updated (present) keys and values out.

That is the shape an ONNX decoder needs: one graph serves the prompt (prefill, an empty cache) and every generated
token (decode, one new position), with batch, sequence and cache lengths symbolic. Hugging Face models keep their
cache in a ``DynamicCache`` object, which neither torch.export nor ONNX can take as an input; the wrapper builds one
from the flat tensors on each call and flattens what the model returns.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fxcompress.errors import InputError


@dataclass(frozen=True)
class CacheLayout:
    """What one layer's cached keys (and values) look like: ``[batch, kv_heads, past_length, head_dim]``.

    Example:
        >>> CacheLayout(layers=2, kv_heads=2, head_dim=16).input_names()[:5]
        ['input_ids', 'attention_mask', 'position_ids', 'past_key_values_0_key', 'past_key_values_0_value']
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, model: nn.Module) -> "CacheLayout":
        """The layout of a transformers causal LM, read from its config.

        Example:
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> CacheLayout.of(LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64,
            ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)))
            CacheLayout(layers=2, kv_heads=2, head_dim=16, dtype=torch.float32)
        """
        config = causal_lm_config(model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = _first(text, "num_attention_heads", "n_head")
        layers = _first(text, "num_hidden_layers", "n_layer")
        hidden = _first(text, "hidden_size", "n_embd")
        if heads is None or layers is None or hidden is None:
            raise InputError(
                f"{type(model).__name__}: its config has no attention head / layer / hidden size fields "
                "(num_attention_heads, num_hidden_layers, hidden_size): fxcompress cannot lay out its KV cache"
            )
        kv_heads = _first(text, "num_key_value_heads") or heads
        head_dim = _first(text, "head_dim") or hidden // heads
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(int(layers), int(kv_heads), int(head_dim), dtype)

    def past_names(self) -> list[str]:
        return [f"past_key_values_{i}_{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *(f"present_{i}_{kind}" for i in range(self.layers) for kind in ("key", "value"))]

    def dynamic_axes(self) -> list[tuple[int, ...]]:
        """Batch and length of the token inputs, batch and cache length of every cached tensor."""
        return [(0, 1), (0, 1), (0, 1), *([(0, 2)] * (2 * self.layers))]

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        """Keys and values of length 0: the cache a prompt starts from."""
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype) for _ in range(2 * self.layers)]

    def example(self, batch: int = 2, length: int = 3, past: int = 4, vocab: int = 2) -> dict[str, torch.Tensor]:
        """Inputs to trace with: every symbolic size at 2 or more (torch.export fixes sizes 0 and 1), with ``past``
        cached positions and ``length`` new ones.

        Example:
            >>> {k: tuple(v.shape) for k, v in CacheLayout(1, 2, 8).example().items()}  # doctest: +NORMALIZE_WHITESPACE
            {'input_ids': (2, 3), 'attention_mask': (2, 7), 'position_ids': (2, 3),
             'past_key_values_0_key': (2, 2, 4, 8), 'past_key_values_0_value': (2, 2, 4, 8)}
        """
        gen = torch.Generator().manual_seed(0)
        out = {
            "input_ids": torch.randint(0, vocab, (batch, length), generator=gen),
            "attention_mask": torch.ones(batch, past + length, dtype=torch.long),
            "position_ids": torch.arange(past, past + length).expand(batch, length).contiguous(),
        }
        for name in self.past_names():
            out[name] = torch.randn(batch, self.kv_heads, past, self.head_dim, generator=gen).to(self.dtype)
        return out


def _first(config: Any, *names: str) -> Optional[Any]:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def causal_lm_config(model: nn.Module) -> Any:
    """The transformers config of ``model``, refusing what is not a causal LM (with the reason).

    Example:
        >>> causal_lm_config(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        fxcompress.errors.InputError: Linear is not a transformers causal LM (it has no .config); ...
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise InputError(
            f"{type(model).__name__} is not a transformers causal LM (it has no .config); give a model built by "
            "AutoModelForCausalLM (or its class, e.g. LlamaForCausalLM), or compress other modules with optimize()"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(
            f"{type(model).__name__} is an encoder-decoder model ({config.model_type}): its cache holds "
            "cross-attention states too, which this decoder export does not lay out; export its encoder with "
            "optimize() instead"
        )
    return config


class KVCacheDecoder(nn.Module):
    """``model`` called with a cache made from flat tensors, returning ``(logits, *present)``.

    Keyword inputs are the names of :meth:`CacheLayout.input_names`; :func:`fxcompress.graph.inputs.called_positionally`
    turns them into the positional graph inputs (and ONNX inputs) of the same names.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
        >>> dec = KVCacheDecoder(lm)
        >>> logits, key, value = dec(**dec.layout.example(vocab=64))
        >>> tuple(logits.shape), tuple(key.shape)
        ((2, 3, 64), (2, 2, 7, 16))
    """

    # torch.export traces every symbolic size at 2 or more and guards on it; this graph is also valid for a decode
    # step (one token) and an empty cache (a prompt), which the generation check runs, so capture drops the guards
    sizes_0_and_1_are_general = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layout = CacheLayout.of(model)
        self.model = model
        from transformers import DynamicCache  # transformers is needed only for decoders

        self._cache_class = DynamicCache
        # transformers 5 renames the argument (past_key_values still works, with a deprecation warning per call)
        params = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, **past):
        flat = [past[name] for name in self.layout.past_names()]
        cache = self._cache_class(
            ddp_cache_data=[(flat[2 * i], flat[2 * i + 1]) for i in range(self.layout.layers)],
            config=self.model.config,
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_argument: cache},
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)
