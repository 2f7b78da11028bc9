"""A causal LM given as a local Hugging Face folder (``config.json`` + safetensors), checked before it is loaded.

Every failure names the file and what to do: a folder without a config, a config that is not a causal LM, a
safetensors file shorter than its header says (a copy cut short), weights missing from the index.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from fxcompress.errors import InputError

PREFIX = "hf:"


def is_folder_spec(spec: str) -> bool:
    """Whether a command-line model argument names a Hugging Face folder (``hf:DIR``).

    Example:
        >>> is_folder_spec("hf:models/tiny-llama"), is_folder_spec("digits_cnn")
        (True, False)
    """
    return spec.startswith(PREFIX)


def check_safetensors(path: Path) -> int:
    """The bytes of tensor data ``path`` holds, after checking that the file is as long as its header says.

    Example:
        >>> from safetensors.torch import save_file
        >>> save_file({"w": torch.zeros(4, 4)}, "w.safetensors")
        >>> check_safetensors(Path("w.safetensors"))
        64
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise InputError(f"{path} is truncated: its header claims {length} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} has an unreadable safetensors header ({exc}); is the file complete?") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise InputError(
            f"{path} is truncated: its tensors end at byte {8 + length + end}, the file has {size} "
            "(an interrupted download or copy); copy it again"
        )
    return end


def load_causal_lm(folder: str | os.PathLike) -> nn.Module:
    """Load the causal LM in ``folder`` (float32, eval mode) after checking its files.

    Example:
        >>> from fxcompress.models.architectures import causal_lm
        >>> causal_lm("qwen2").save_pretrained("tiny-qwen")
        >>> type(load_causal_lm("tiny-qwen")).__name__
        'Qwen2ForCausalLM'
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; hf:DIR names a local Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{folder} has no *.safetensors weights (fxcompress reads safetensors, not .bin pickles)")
    for path in weights:
        check_safetensors(path)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError for unknown or broken configs
        raise InputError(f"{folder}/config.json cannot be read by transformers: {_first(exc)}") from exc
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        raise InputError(
            f"{folder} holds a {type(config).__name__} ({getattr(config, 'model_type', '?')}), which is not a "
            "causal language model: hf:DIR compresses decoders such as Llama, Qwen, Phi-3 or GPT-2"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:
        raise InputError(f"cannot load the model in {folder}: {_first(exc)}") from exc
    return model.eval()


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
