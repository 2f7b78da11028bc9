"""Calibration data: batches of model inputs, and which of their positions are padding."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch

from fxcompress.errors import InputError
from fxcompress.graph.inputs import normalize_inputs


class Calibration(list):
    """Calibration batches (a list of input tuples) that can say which positions are padding.

    ``token_mask`` is the index (or, for keyword inputs, the name) of the input holding a [batch, seq] mask (1 =
    real token, 0 = padding, e.g. a tokenizer's attention_mask). Statistics then skip padded positions: with short
    sentences padded to a fixed length most rows are padding, and their activations would otherwise dominate the
    Hessians and ranges that GPTQ, activation-aware SVD, static int8 and activation pruning are fitted to.

    Example:
        >>> ids, mask = torch.randint(0, 100, (2, 6)), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
        >>> calib = Calibration([(ids, mask)], token_mask=1)  # then optimize(..., calibration=calib)
        >>> calib.token_mask, len(calib)
        (1, 1)
    """

    def __init__(self, batches: Iterable[tuple] = (), token_mask: Union[int, str, None] = None) -> None:
        super().__init__(batches)
        self.token_mask = token_mask


def positional_calibration(batches: Iterable[Any], names: Optional[Sequence[str]]) -> Calibration:
    """``batches`` (tuples, or dicts with the keywords ``names``) as a Calibration of tuples, its token mask an index.

    Example:
        >>> ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6)
        >>> calib = Calibration([{"input_ids": ids, "attention_mask": mask}], token_mask="attention_mask")
        >>> positional_calibration(calib, ("input_ids", "attention_mask")).token_mask
        1
    """
    token_mask = getattr(batches, "token_mask", None)
    if isinstance(token_mask, str):
        if names is None or token_mask not in names:
            raise InputError(
                f"calibration token_mask={token_mask!r} names no keyword input "
                f"({'inputs are positional: give its index' if names is None else 'keywords: ' + ', '.join(names)})"
            )
        token_mask = list(names).index(token_mask)
    return Calibration((normalize_inputs(b, names) for b in batches), token_mask)


def real_rows(value: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``value`` without its padded positions, as [tokens, *rest], when its leading dims are the mask's.

    Example:
        >>> real_rows(torch.zeros(2, 3, 8), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([3, 8])
    """
    if mask is None or value.dim() <= mask.dim() or tuple(value.shape[: mask.dim()]) != tuple(mask.shape):
        return value
    return value[mask.bool()]


def batch_mask(batches: Sequence[tuple], i: int, batch: tuple) -> Optional[torch.Tensor]:
    """Batch ``i``'s [batch, seq] padding mask when ``batches`` is a :class:`Calibration` with a token mask.

    Example:
        >>> ids, mask = torch.randint(0, 100, (2, 6)), torch.ones(2, 6)
        >>> batch_mask(Calibration([(ids, mask)], token_mask=1), 0, (ids, mask)) is mask
        True
    """
    token_mask = getattr(batches, "token_mask", None)
    if token_mask is None:
        return None
    if not (token_mask < len(batch) and isinstance(batch[token_mask], torch.Tensor) and batch[token_mask].dim() == 2):
        raise InputError(
            f"calibration token_mask={token_mask} must name a [batch, seq] tensor input; "
            f"batch {i} has {len(batch)} inputs"
        )
    return batch[token_mask]
