"""Small built-in example models to validate and train: a nanoGPT-style decoder and an encoder classifier.

Example::

    >>> model = example_model("gpt-micro")           # byte-level, CPU-sized
    >>> logits = model(torch.randint(0, 256, (2, 16)))
    >>> tuple(logits.shape)
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.common.checks import is_int, is_number


@dataclass(frozen=True)
class GPTConfig:
    """Size of a :class:`GPT`. ``block_size`` is the context length."""

    vocab_size: int = 4096
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True


@dataclass(frozen=True)
class EncoderConfig:
    """Size of an :class:`EncoderClassifier`. ``max_seq_len`` is the context length."""

    vocab_size: int = 256
    max_seq_len: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    num_classes: int = 2
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only language model in the style of nanoGPT: token and learned position embeddings,
    pre-LayerNorm blocks with causal SDPA attention, and an output head tied to the token embedding.

    Example::

        >>> model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
        >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 256])

    Args:
        config: a :class:`GPTConfig`; kept as ``model.config`` so ``find_vocab_size`` and
            ``find_context_length`` read it.
    """

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        config = GPTConfig() if config is None else config
        _raise_for_config(config, f"GPT({config!r})")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(
                f"Cannot run a sequence of length {t}: this model's context is "
                f"block_size={self.config.block_size}."
            )
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


class EncoderClassifier(nn.Module):
    """A bidirectional ``nn.TransformerEncoder`` over token ids, mean-pooled into class logits.

    Example::

        >>> model = EncoderClassifier(EncoderConfig(num_classes=3))
        >>> model(torch.zeros(2, 10, dtype=torch.long)).shape
        torch.Size([2, 3])
    """

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        config = EncoderConfig() if config is None else config
        _raise_for_config(config, f"EncoderClassifier({config!r})")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.n_embd)
        layer = nn.TransformerEncoderLayer(
            config.n_embd, config.n_head, dim_feedforward=4 * config.n_embd, dropout=config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Nested tensors need norm_first=False; without them there is nothing to warn about.
        self.encoder = nn.TransformerEncoder(layer, config.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for token ids of shape ``(B, T)``."""
        _, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(
                f"Cannot run a sequence of length {t}: this model's context is "
                f"max_seq_len={self.config.max_seq_len}."
            )
        pos = torch.arange(t, device=input_ids.device)
        x = self.encoder(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        return self.head(self.norm(x).mean(dim=1))  # (B, num_classes)


EXAMPLE_MODELS: dict[str, tuple[type[nn.Module], object]] = {
    # The reference model of the training-loop benchmark.
    "gpt-tiny": (GPT, GPTConfig()),
    # Same class, byte-level: for tests and CI-sized notebook runs.
    "gpt-micro": (GPT, GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)),
    "encoder-classifier": (EncoderClassifier, EncoderConfig()),
}


def _config_problems(config) -> list[str]:
    """What is wrong with a config's values, one phrase per problem (empty when it is fine)."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and not is_int(value, minimum=1):
            problems.append(f"{f.name}={value!r} must be a positive int")
        elif f.type == "float" and not is_number(value, minimum=0.0, below=1.0):
            problems.append(f"{f.name}={value!r} must be a float in [0, 1)")
        elif f.type == "bool" and not isinstance(value, bool):
            problems.append(f"{f.name}={value!r} must be True or False")
    if not problems and config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
    return problems


def _raise_for_config(config, call: str) -> None:
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"{call}: {'; '.join(problems)}.")


def example_model(name: str = "gpt-tiny", **overrides) -> nn.Module:
    """Build one of the built-in example models, optionally resized.

    Example::

        >>> model = example_model("gpt-micro", n_layer=1)
        >>> model.config.n_layer, model.config.vocab_size
        (1, 256)
        >>> example_model("encoder-classifier", num_classes=5)(torch.zeros(1, 4, dtype=torch.long)).shape
        torch.Size([1, 5])

    Args:
        name: ``"gpt-tiny"`` (default; the training benchmark's reference model: vocab 4096,
            width 256, 4 layers, 4 heads, context 128, ~4.2M parameters), ``"gpt-micro"``
            (vocab 256 = bytes, width 64, 2 layers, 2 heads, context 64) or
            ``"encoder-classifier"`` (bidirectional encoder, class logits ``(B, num_classes)``).
        **overrides: config fields to change (see :class:`GPTConfig`, :class:`EncoderConfig`).

    Raises:
        ValueError: an unknown name, an unknown override, or a bad value; the message lists what
            is allowed.
    """
    call = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in overrides.items()])
    call = f"example_model({call})"
    if name not in EXAMPLE_MODELS:
        raise ValueError(f"{call}: unknown model {name!r}. Available: {', '.join(map(repr, EXAMPLE_MODELS))}.")
    cls, config = EXAMPLE_MODELS[name]
    allowed = [f.name for f in dataclasses.fields(config)]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ValueError(
            f"{call}: unknown override {', '.join(map(repr, unknown))}. "
            f"{name!r} accepts: {', '.join(allowed)}."
        )
    config = dataclasses.replace(config, **overrides)
    _raise_for_config(config, call)
    return cls(config)
