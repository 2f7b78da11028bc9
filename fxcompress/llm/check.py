"""The decoder's parity check: does the artifact generate what torch generates, and how much worse does it predict?

Three measurements, each on ONNX Runtime against the float torch model:
- greedy tokens: the artifact's loop (:func:`fxcompress.llm.generate.greedy`) against transformers' ``generate``;
- teacher-forced logits: the prompt plus torch's tokens in one call, compared position by position (cosine, and how
  often the top token agrees), which, unlike free-running tokens, does not stop meaning anything after one flip;
- perplexity on text, when text is given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from fxcompress.checker.metrics import compare
from fxcompress.errors import InputError
from fxcompress.llm.compress import prompt_inputs
from fxcompress.llm.decoder import causal_lm_config
from fxcompress.llm.generate import OrtDecoder
from fxcompress.recipe.tolerance import Tolerance


@dataclass
class DecoderReport:
    """What :func:`check_decoder` measured; ``passed`` when every gate in ``failures`` held.

    ``token_agreement``: share of the new tokens equal to torch's, position by position (a row counts until its end
    of sequence); ``first_divergence``: the first new-token index where any row differs (None: none).
    """

    provider: str
    new_tokens: int
    token_agreement: float
    first_divergence: Optional[int]
    logits_cosine: Optional[float]
    logits_cosine_min: Optional[float]
    top1_agreement: float
    perplexity_torch: Optional[float] = None
    perplexity_onnx: Optional[float] = None
    tokens_torch: list[list[int]] = field(default_factory=list)
    tokens_onnx: list[list[int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def perplexity_increase(self) -> Optional[float]:
        """Relative perplexity increase of the artifact over torch (0.01: 1% higher)."""
        if self.perplexity_torch is None or self.perplexity_onnx is None:
            return None
        return self.perplexity_onnx / self.perplexity_torch - 1.0

    def summary(self) -> str:
        """The report in a few lines."""
        lines = [
            f"decoder parity on {self.provider}: {'PASSED' if self.passed else 'FAILED'}",
            f"  greedy tokens: {self.token_agreement:.1%} of {self.new_tokens} new tokens equal to torch's generate"
            + ("" if self.first_divergence is None else f" (first difference at new token {self.first_divergence})"),
            f"  teacher-forced logits: cosine {_f(self.logits_cosine)} (worst position {_f(self.logits_cosine_min)}), "
            f"top-1 agreement {self.top1_agreement:.1%}",
        ]
        if self.perplexity_torch is not None:
            lines.append(
                f"  perplexity: torch {self.perplexity_torch:.3f}, artifact {self.perplexity_onnx:.3f} "
                f"({self.perplexity_increase:+.2%})"
            )
        lines += [f"  FAIL: {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "perplexity_increase": self.perplexity_increase}


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.5f}"


def check_decoder(
    model: nn.Module,
    artifact: str | os.PathLike,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    attention_mask: Optional[torch.Tensor] = None,
    text: Optional[torch.Tensor] = None,
    window: int = 128,
    provider: str = "auto",
    cosine_min: Optional[float] = None,
    exact_tokens: Optional[bool] = None,
    max_perplexity_increase: Optional[float] = None,
) -> DecoderReport:
    """Run the decoder ``artifact`` on ONNX Runtime against the float causal LM ``model``.

    Args:
        model: the original transformers causal LM.
        artifact: an ONNX decoder written by ``optimize_decoder(...).export(path)``.
        prompts: ``[batch, length]`` token ids (left-padded rows need ``attention_mask``).
        max_new_tokens: greedy tokens to generate on both sides.
        text: token ids ``[length]`` (or ``[rows, length]``) to measure perplexity on, in windows of ``window``.
        cosine_min: floor on the mean teacher-forced logits cosine; default: the artifact's own tolerance (the one
            its recipe implies, stored at export).
        exact_tokens: require the greedy tokens to equal torch's; default: when the recipe is lossless (an fp32
            artifact).
        max_perplexity_increase: a ceiling on the relative perplexity increase (0.03: 3%), when ``text`` is given.

    Example:
        >>> rep = check_decoder(lm, "decoder.onnx", torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8)
        >>> rep.token_agreement, rep.passed
        (1.0, True)
    """
    config = causal_lm_config(model)
    decoder = OrtDecoder(artifact, provider=provider)
    meta = decoder.session.get_modelmeta().custom_metadata_map
    tolerance = Tolerance.from_dict(json.loads(meta.get("fxcompress.tolerance", "{}")))
    recipe = json.loads(meta.get("fxcompress.recipe", "[]"))
    if cosine_min is None:
        cosine_min = tolerance.cosine_min
    if exact_tokens is None:
        exact_tokens = not recipe
    if prompts.dim() == 1:
        prompts = prompts[None]
    mask = torch.ones_like(prompts) if attention_mask is None else attention_mask.to(torch.long)
    eos = _eos(config)
    model = model.eval()

    with torch.no_grad():
        reference = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )[:, prompts.shape[1] :]
    produced = decoder.generate(prompts, reference.shape[1], attention_mask=mask, eos_token_id=eos)
    agreement, first = _agreement(reference, produced, eos)

    # teacher forcing on torch's own continuation: every position is compared, whatever the artifact generated
    full = torch.cat([prompts, reference], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(reference)], dim=1)
    feeds = prompt_inputs(decoder.layout, full, full_mask)  # positions as generate counts them under left padding
    with torch.no_grad():
        want = model(input_ids=full, attention_mask=full_mask, position_ids=feeds["position_ids"]).logits
    got = decoder.step(feeds)[0]
    keep = full_mask.bool()
    metrics = compare([want[keep].numpy()], [got[keep].numpy()])
    top1 = float((want[keep].argmax(-1) == got[keep].argmax(-1)).float().mean())

    report = DecoderReport(
        decoder.provider,
        int(reference.shape[1]),
        agreement,
        first,
        metrics["cosine"],
        metrics["cosine_min"],
        top1,
        tokens_torch=reference.tolist(),
        tokens_onnx=produced.tolist(),
    )
    if text is not None:
        report.perplexity_torch, report.perplexity_onnx = _perplexities(model, decoder, text, window)

    if report.logits_cosine is None or report.logits_cosine < cosine_min:
        report.failures.append(f"teacher-forced logits cosine {_f(report.logits_cosine)} < {cosine_min}")
    if exact_tokens and agreement < 1.0:
        report.failures.append(
            f"greedy tokens differ from torch's generate at new token {first} (a lossless artifact must match)"
        )
    increase = report.perplexity_increase
    if max_perplexity_increase is not None and increase is not None and increase > max_perplexity_increase:
        report.failures.append(f"perplexity {increase:+.2%} over torch's, more than {max_perplexity_increase:.2%}")
    return report


def _eos(config: Any) -> Optional[int]:
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    vocab = getattr(config, "vocab_size", None)
    return eos if isinstance(eos, int) and (vocab is None or 0 <= eos < vocab) else None


def _agreement(reference: torch.Tensor, produced: torch.Tensor, eos: Optional[int]) -> tuple[float, Optional[int]]:
    """Share of equal tokens, each row counted up to and including its reference end of sequence."""
    length = min(reference.shape[1], produced.shape[1])
    ref, out = reference[:, :length], produced[:, :length]
    counted = torch.ones_like(ref, dtype=torch.bool)
    if eos is not None:
        ended = (ref == eos).long().cumsum(1)
        counted = (ended - (ref == eos).long()) == 0  # up to and including the first eos
    equal = (ref == out) | ~counted
    differs = (~equal).any(0).nonzero()
    total = int(counted.sum())
    agreement = float(((ref == out) & counted).sum()) / max(total, 1)
    if reference.shape[1] != produced.shape[1]:
        agreement *= length / max(reference.shape[1], produced.shape[1])
    return agreement, int(differs[0]) if len(differs) else None


def _perplexities(model: nn.Module, decoder: OrtDecoder, text: torch.Tensor, window: int) -> tuple[float, float]:
    """Perplexity of ``text`` under torch and under the artifact, over non-overlapping windows (each one prompt)."""
    if window < 2:
        raise InputError(f"window must be 2 tokens or more, got {window}")
    rows = text[None] if text.dim() == 1 else text
    nll = {"torch": 0.0, "onnx": 0.0}
    count = 0
    for row in rows:
        for start in range(0, row.numel() - 1, window):
            ids = row[start : start + window][None]
            if ids.shape[1] < 2:
                continue
            with torch.no_grad():
                want = model(input_ids=ids).logits
            got = decoder.logits(ids)
            target = ids[0, 1:]
            for key, logits in (("torch", want), ("onnx", got)):
                logp = torch.log_softmax(logits[0, :-1].double(), -1)
                nll[key] -= float(logp.gather(1, target[:, None]).sum())
            count += target.numel()
    if not count:
        raise InputError("text has fewer than 2 tokens: nothing to measure perplexity on")
    return math.exp(nll["torch"] / count), math.exp(nll["onnx"] / count)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood of ``ids`` (``[batch, length]``) under ``logits``.

    Example:
        >>> round(perplexity(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]])), 3)  # uniform over 4 tokens
        4.0
    """
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return float(np.exp(-logp.gather(2, ids[:, 1:, None]).mean()))
