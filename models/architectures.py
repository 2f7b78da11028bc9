"""Architectures users bring, rebuilt from their public configurations with random weights (nothing is downloaded):
torchvision's ResNet-18, MobileNetV3-small, EfficientNet-B0 and ViT-B/16 layouts, an M5-style Conv1d audio net, and
LSTM / GRU taggers. Widths and depths follow the published configurations; ``scale`` shrinks them for tests.

Each factory returns ``(model, example_inputs)``, seeded, in eval mode, with non-trivial BatchNorm statistics (so that
folding them is really tested).

Example:
    >>> model, example = resnet18(image=64)
    >>> model(*example).shape
    torch.Size([2, 1000])
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm statistics a trained network would have (not the identity of a fresh one).

    Example:
        >>> bn = randomize_batch_norms(nn.BatchNorm2d(4), torch.Generator().manual_seed(0))
        >>> bool((bn.running_var != 1).all())
        True
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


def _conv_bn(
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = None,
    dims: int = 2,
) -> nn.Sequential:
    conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --- ResNet-18 ----------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride, act=lambda: nn.ReLU(inplace=True))
        self.conv2 = _conv_bn(cout, cout, 3)
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7 stem, four stages of two BasicBlocks (64-512 channels), fc."""

    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, width, 7, 2, act=lambda: nn.ReLU(inplace=True)), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stages += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def _image_model(build: Callable[[], nn.Module], image: int, batch: int) -> tuple[nn.Module, tuple]:
    """``build()`` (its weights drawn after seeding) with trained-like BatchNorm statistics, in eval mode, and a
    seeded batch of RGB images."""
    g = _seeded()
    return randomize_batch_norms(build(), g).eval(), (torch.randn(batch, 3, image, image, generator=g),)


def resnet18(image: int = 224, batch: int = 2, width: int = 64) -> tuple[nn.Module, tuple]:
    """ResNet-18 (11.7M parameters at width 64), random weights.

    Example:
        >>> sum(p.numel() for p in resnet18()[0].parameters())
        11689512
    """
    return _image_model(lambda: ResNet18(width=width), image, batch)


# --- MobileNetV3-small and EfficientNet-B0 ----------------------------------------------------------------------------
def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    def __init__(
        self, channels: int, squeeze: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        self.fc1, self.act = nn.Conv2d(channels, squeeze, 1), act()
        self.fc2, self.gate = nn.Conv2d(squeeze, channels, 1), gate()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise kxk, optional squeeze-excite, project 1x1; a residual when shapes allow."""

    def __init__(
        self,
        cin: int,
        k: int,
        expanded: int,
        cout: int,
        se: Callable[[int], nn.Module] | None,
        act: Callable[[], nn.Module],
        stride: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn(cin, expanded, 1, act=act))
        layers.append(_conv_bn(expanded, expanded, k, stride, groups=expanded, act=act))
        if se is not None:
            layers.append(se(expanded))
        layers.append(_conv_bn(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.residual else out


# torchvision's mobilenet_v3_small: input, kernel, expanded, output, squeeze-excite, activation, stride
_MOBILENET_V3_SMALL = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        for cin, k, expanded, cout, use_se, act_name, stride in _MOBILENET_V3_SMALL:
            act = nn.ReLU if act_name == "RE" else nn.Hardswish
            se = (lambda c: SqueezeExcite(c, _divisible(c // 4), nn.ReLU, nn.Hardsigmoid)) if use_se else None
            blocks.append(InvertedResidual(cin, k, expanded, cout, se, act, stride))
        blocks.append(_conv_bn(96, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_v3_small(image: int = 224, batch: int = 2) -> tuple[nn.Module, tuple]:
    """MobileNetV3-small (2.5M parameters): depthwise convs, squeeze-excite, hard-swish; random weights.

    Example:
        >>> sum(p.numel() for p in mobilenet_v3_small()[0].parameters())
        2542856
    """
    return _image_model(MobileNetV3Small, image, batch)


# torchvision's efficientnet_b0 stages: expansion, kernel, stride, input, output, repeats
_EFFICIENTNET_B0 = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


def _efficientnet_se(channels: int, squeeze: int) -> SqueezeExcite:
    return SqueezeExcite(channels, squeeze, nn.SiLU, nn.Sigmoid)


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)]
        for expand, k, stride, cin, cout, repeats in _EFFICIENTNET_B0:
            for i in range(repeats):
                inp = cin if i == 0 else cout
                se = functools.partial(_efficientnet_se, squeeze=max(1, inp // 4))
                blocks.append(InvertedResidual(inp, k, inp * expand, cout, se, nn.SiLU, stride if i == 0 else 1))
        blocks.append(_conv_bn(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def efficientnet_b0(image: int = 224, batch: int = 2) -> tuple[nn.Module, tuple]:
    """EfficientNet-B0 (5.3M parameters): MBConv blocks with squeeze-excite and SiLU; random weights.

    Example:
        >>> sum(p.numel() for p in efficientnet_b0()[0].parameters())
        5288548
    """
    return _image_model(EfficientNetB0, image, batch)


# --- ViT --------------------------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    """torchvision's ViT block: pre-norm nn.MultiheadAttention (packed in-projection) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1, self.self_attention = (
            nn.LayerNorm(dim, eps=1e-6),
            nn.MultiheadAttention(dim, heads, batch_first=True),
        )
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, mlp: int, num_classes: int = 1000):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, mlp) for _ in range(depth)))
        self.ln, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


def vit(
    image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12, mlp: int = 3072, batch: int = 2
) -> tuple[nn.Module, tuple]:
    """ViT-B/16 by default (86.6M parameters); smaller configurations for tests.

    Example:
        >>> model, example = vit(image=32, dim=64, depth=2, heads=4, mlp=128)
        >>> model(*example).shape
        torch.Size([2, 1000])
    """
    g = _seeded()
    model = VisionTransformer(image, patch, dim, depth, heads, mlp).eval()
    return model, (torch.randn(batch, 3, image, image, generator=g),)


# --- audio and sequences ----------------------------------------------------------------------------------------------
class AudioNet(nn.Module):
    """M5 (Dai et al., 2017): Conv1d + BatchNorm stages over raw audio, global pooling, a classifier."""

    def __init__(self, classes: int = 35, width: int = 128) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            _conv_bn(1, width, 80, 4, act=nn.ReLU, dims=1),
            nn.MaxPool1d(4),
            _conv_bn(width, width, 3, act=nn.ReLU, dims=1),
            nn.MaxPool1d(4),
            _conv_bn(width, 2 * width, 3, act=nn.ReLU, dims=1),
            nn.MaxPool1d(4),
            _conv_bn(2 * width, 4 * width, 3, act=nn.ReLU, dims=1),
            nn.MaxPool1d(4),
        )
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(x).mean(-1))


def audio_net(samples: int = 8000, batch: int = 2, width: int = 128) -> tuple[nn.Module, tuple]:
    """An M5-style keyword spotter over one second of 8 kHz audio.

    Example:
        >>> model, example = audio_net(width=16)
        >>> model(*example).shape
        torch.Size([2, 35])
    """
    g = _seeded()
    model = randomize_batch_norms(AudioNet(width=width), g).eval()
    return model, (torch.randn(batch, 1, samples, generator=g),)


class Tagger(nn.Module):
    """Embedding -> LSTM or GRU -> per-token classifier."""

    def __init__(self, cell: str = "lstm", vocab: int = 1000, dim: int = 128, hidden: int = 256, tags: int = 17):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, tags)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.rnn(self.embed(ids))[0])


def tagger(cell: str = "lstm", length: int = 20, batch: int = 2) -> tuple[nn.Module, tuple]:
    """A recurrent sequence tagger (``cell``: ``"lstm"`` or ``"gru"``).

    Example:
        >>> model, example = tagger("gru")
        >>> model(*example).shape
        torch.Size([2, 20, 17])
    """
    g = _seeded()
    return Tagger(cell).eval(), (torch.randint(0, 1000, (batch, length), generator=g),)


def param_count(model: nn.Module) -> int:
    """Parameters of ``model`` (tied ones once).

    Example:
        >>> param_count(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in model.parameters())


# --- transformers encoders from their public configurations -----------------------------------------------------------
def _hf_config(kind: str, scale: float) -> tuple[type, object]:
    """(model class, config) of a transformers architecture at its published size (``scale=1``) or shrunk."""
    import transformers as hf

    def s(v: int, floor: int = 1) -> int:
        return max(floor, int(v * scale))

    if kind == "bert":  # bert-base-uncased
        cfg = hf.BertConfig(
            hidden_size=s(768, 32), num_hidden_layers=s(12), num_attention_heads=s(12, 2),
            intermediate_size=s(3072, 64),
        )  # fmt: skip
        return hf.BertModel, cfg
    if kind == "distilbert":  # distilbert-base-uncased
        cfg = hf.DistilBertConfig(dim=s(768, 32), n_layers=s(6), n_heads=s(12, 2), hidden_dim=s(3072, 64))
        return hf.DistilBertModel, cfg
    if kind == "t5_encoder":  # t5-small
        cfg = hf.T5Config(
            d_model=s(512, 32), d_kv=64 if scale == 1 else 16, d_ff=s(2048, 64), num_layers=s(6), num_heads=s(8, 2),
        )  # fmt: skip
        return hf.T5EncoderModel, cfg
    if kind == "whisper_encoder":  # whisper-tiny's encoder
        cfg = hf.WhisperConfig(
            d_model=s(384, 32), encoder_layers=s(4), encoder_attention_heads=s(6, 2), encoder_ffn_dim=s(1536, 64),
            max_source_positions=s(1500, 16),
        )  # fmt: skip
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder, cfg
    raise ValueError(f"unknown transformers architecture {kind!r}: bert, distilbert, t5_encoder or whisper_encoder")


def hf_encoder(kind: str = "bert", scale: float = 1.0, batch: int = 2, length: int = 32) -> tuple[nn.Module, dict]:
    """A transformers encoder (``bert``, ``distilbert``, ``t5_encoder``, ``whisper_encoder``) with random weights,
    and keyword example inputs as it is called (``input_ids`` + ``attention_mask``; ``input_features`` for Whisper).

    Example:
        >>> model, example = hf_encoder("distilbert", scale=0.1)
        >>> sorted(example), model(**example).last_hidden_state.shape
        (['attention_mask', 'input_ids'], torch.Size([2, 32, 76]))
    """
    cls, cfg = _hf_config(kind, scale)
    if scale < 1 and hasattr(cfg, "vocab_size"):
        cfg.vocab_size = 1000  # a 30k-row embedding would dominate a shrunk model's bytes and test time
    g = _seeded()
    model = cls(cfg).eval()
    if kind == "whisper_encoder":  # log-mel frames: two per encoder position (its second conv has stride 2)
        frames = 2 * cfg.max_source_positions
        return model, {"input_features": torch.randn(batch, cfg.num_mel_bins, frames, generator=g)}
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # one padded sentence, so that the mask matters
    return model, {"input_ids": ids, "attention_mask": mask}


# --- transformers decoders (causal LMs) from their public configurations ----------------------------------------------
CAUSAL_LM_FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gpt2")


def causal_lm(
    family: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    intermediate: int | None = None,
    tie: bool | None = None,
    seed: int = 0,
) -> nn.Module:
    """A transformers causal LM of ``family`` (``llama``, ``qwen2``, ``qwen3``, ``phi3``, ``gpt2``) with random
    weights at the given size, in eval mode. ``tie`` ties the head to the token embedding (default: the family's
    default; GPT-2 always ties). Llama-style layouts use grouped-query attention (``kv_heads`` < ``heads``).

    Example:
        >>> lm = causal_lm("qwen2")
        >>> type(lm).__name__, lm(torch.tensor([[1, 2, 3]])).logits.shape
        ('Qwen2ForCausalLM', torch.Size([1, 3, 256]))
    """
    import transformers as hf

    torch.manual_seed(seed)
    inter = intermediate or 2 * hidden
    if family == "gpt2":
        config = hf.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        )  # fmt: skip
        model = hf.GPT2LMHeadModel(config)
    else:
        classes = {
            "llama": (hf.LlamaConfig, hf.LlamaForCausalLM),
            "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM),
            "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM),
            "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM),
        }
        if family not in classes:
            raise ValueError(f"unknown causal LM family {family!r}: one of {', '.join(CAUSAL_LM_FAMILIES)}")
        config_class, model_class = classes[family]
        config = config_class(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
            head_dim=hidden // heads, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        if tie is not None:
            config.tie_word_embeddings = tie
        model = model_class(config)
    return model.eval()
