"""Greedy generation with a KV-cache decoder: the same loop drives an ONNX artifact on ONNX Runtime and a torch
module, so that a difference in tokens is the artifact's and never the loop's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fxcompress.checker.runtime import choose_providers, import_ort
from fxcompress.errors import InputError
from fxcompress.llm.compress import prompt_inputs
from fxcompress.llm.decoder import CacheLayout

# one decoder call: named inputs -> (logits [batch, length, vocab], present keys and values in input order)
Step = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]


def greedy(
    step: Step,
    layout: CacheLayout,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
) -> torch.Tensor:
    """The ``max_new_tokens`` tokens (``[batch, new]``) that greedy decoding appends to the prompt: one prompt call,
    then one call per token on the cache the previous call returned. Stops early when every row has emitted
    ``eos_token_id``; rows that finished are padded with it, as transformers' ``generate`` does.

    Example:
        >>> dec = OrtDecoder("decoder.onnx")
        >>> greedy(dec.step, dec.layout, torch.tensor([[1, 2, 3]]), 4).shape
        torch.Size([1, 4])
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be 1 or more, got {max_new_tokens}")
    feeds = prompt_inputs(layout, input_ids, attention_mask)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        logits, present = step(feeds)
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        new.append(token)
        if eos_token_id is not None and bool(done.all()):
            break
        mask = torch.cat([feeds["attention_mask"], torch.ones_like(token)[:, None]], dim=1)
        feeds = {
            "input_ids": token[:, None],
            "attention_mask": mask,
            "position_ids": feeds["position_ids"][:, -1:] + 1,
            **dict(zip(layout.past_names(), present)),
        }
    return torch.stack(new, dim=1)


class OrtDecoder:
    """An exported decoder (:func:`fxcompress.llm.compress.optimize_decoder`) in an ONNX Runtime session.

    Example:
        >>> dec = OrtDecoder("decoder.onnx", provider="cpu")
        >>> dec.provider, dec.layout.layers
        ('CPUExecutionProvider', 2)
        >>> dec.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
        torch.Size([1, 4])
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto"):
        ort = import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no decoder at {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=choose_providers(provider))
        self.provider = self.session.get_providers()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        if "fxcompress.decoder" not in meta:
            raise InputError(
                f"{self.path} is not a KV-cache decoder written by fxcompress (no fxcompress.decoder metadata); "
                "export one with fxcompress.llm.optimize_decoder(...).export(path)"
            )
        info = json.loads(meta["fxcompress.decoder"])
        self.info = info
        self.layout = CacheLayout(
            info["layers"], info["kv_heads"], info["head_dim"], getattr(torch, info["cache_dtype"])
        )
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def step(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One call of the decoder: named torch tensors in, logits and the present cache out."""
        arrays = {name: feeds[name].detach().cpu().numpy() for name in self._inputs}
        logits, *present = self.session.run(self._outputs, arrays)
        return torch.from_numpy(np.asarray(logits)), [torch.from_numpy(np.asarray(p)) for p in present]

    def logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The logits of every position of a prompt (one call on an empty cache)."""
        return self.step(prompt_inputs(self.layout, input_ids, attention_mask))[0]

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        attention_mask: Optional[torch.Tensor] = None,
        eos_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding (see :func:`greedy`): the new tokens, ``[batch, new]``."""
        return greedy(self.step, self.layout, input_ids, max_new_tokens, attention_mask, eos_token_id)


def torch_step(module: torch.nn.Module, names: Sequence[str]) -> Step:
    """:data:`Step` for a torch module taking the decoder's inputs positionally in ``names`` order (the compressed
    module of :func:`~fxcompress.llm.compress.optimize_decoder`, as ``cm.module`` with ``cm.input_names``)."""

    def step(feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            logits, *present = module(*(feeds[n] for n in names))
        return logits, list(present)

    return step
