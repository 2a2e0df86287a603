"""Models as users write them, shared by the tests (not collected: no ``test_`` prefix).

Import with ``from user_models import ...``; pytest puts ``tests/`` on ``sys.path``. Tests also copy
this file into a temporary folder as a user's ``model.py`` (so it imports nothing but torch).

The conventions of widely used hand-written transformers, written here from scratch:

- :class:`NanoGPT` takes a config dataclass, keeps it as ``config.block_size``, asserts the
  length, and ``forward(idx, targets=None)`` returns ``(logits, loss)``, with only the last
  position's logits when called without targets;
- :class:`Transformer` takes ``ModelArgs``, keeps them as ``self.params`` (``max_seq_len``), has no
  position table (a fixed buffer instead), returns logits only and keeps the loss in
  ``self.last_loss``, again last position only without targets;
- :class:`ClosureLM` has blocks whose MLP is a lambda closing over a sub-module.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class TransformerLM(nn.Module):
    """A causal LM on ``torch.nn.Transformer`` (encoder, decoder and cross attention, all masked),
    with no position table: no fixed context."""

    def __init__(self, vocab_size=64, width=32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.transformer = nn.Transformer(width, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, width)
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)  # (T, T)
        return self.head(self.transformer(x, x, src_mask=mask, tgt_mask=mask, memory_mask=mask))


class TupleLM(nn.Module):
    """No attention at all; returns ``(logits, hidden)`` like many hand-written models, and keeps
    its ``vocab_size`` as an attribute."""

    def __init__(self, vocab_size=50, width=16):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids):
        hidden = self.mlp(self.emb(ids))  # (B, T, width)
        return self.head(hidden), hidden


def tiny_gpt2(**config):
    """A two-layer Hugging Face GPT-2 (vocab 96, context 24, width 32); ``config`` adds to its
    ``GPT2Config`` (e.g. ``attn_implementation="eager"``). Skips the test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(vocab_size=96, n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0, **config)
    return transformers.GPT2LMHeadModel(gpt2)


# ---- a GPT with a config dataclass and forward(idx, targets=None) -> (logits, loss) ---------------

@dataclass
class NanoConfig:
    vocab_size: int = 256
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, c/heads)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class _NanoBlock(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)
        self.attn = _SelfAttention(config.n_embd, config.n_head)
        self.ff = nn.Sequential(nn.Linear(config.n_embd, 2 * config.n_embd), nn.GELU(),
                                nn.Linear(2 * config.n_embd, config.n_embd))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(_NanoBlock(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        assert t <= self.config.block_size  # a bare assert, as such files have
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if targets is None:  # inference shortcut: only the next token's logits
            return self.head(x[:, -1:, :]), None  # (B, 1, V)
        logits = self.head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# ---- a Llama-style Transformer(ModelArgs), sizes in self.params -------------------------------------

@dataclass
class ModelArgs:
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 2
    vocab_size: int = 256
    max_seq_len: int = 32


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).type_as(x) * self.weight


class _GatedBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm, self.ff_norm = _RMSNorm(args.dim), _RMSNorm(args.dim)
        self.attn = _SelfAttention(args.dim, args.n_heads)
        self.gate, self.up = nn.Linear(args.dim, 2 * args.dim, bias=False), nn.Linear(args.dim, 2 * args.dim, bias=False)
        self.down = nn.Linear(2 * args.dim, args.dim, bias=False)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        h = self.ff_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.embed = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(_GatedBlock(params) for _ in range(params.n_layers))
        self.norm = _RMSNorm(params.dim)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # A fixed table as long as the context, in a buffer (not a parameter): longer inputs fail
        # with a shape error, as a rotary table does.
        angle = torch.arange(params.max_seq_len)[:, None] / 100 ** (torch.arange(params.dim)[None] / params.dim)
        self.register_buffer("freqs", torch.sin(angle + math.pi / 4), persistent=False)  # (max_seq_len, dim)
        self.last_loss = None

    def forward(self, tokens, targets=None):
        h = self.embed(tokens) + self.freqs[:tokens.shape[1]]  # (B, T, dim)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        if targets is None:
            self.last_loss = None
            return self.output(h[:, [-1], :])  # (B, 1, V)
        logits = self.output(h)
        self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits


# ---- a block whose MLP is a lambda over its own sub-module -------------------------------------------

class _ClosureBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(fc=nn.Linear(width, 2 * width), act=nn.GELU(), proj=nn.Linear(2 * width, width)))
        m = self.mlp
        self.mlpf = lambda x: m.proj(m.act(m.fc(x)))  # closes over *this* block's layers

    def forward(self, x):
        return x + self.mlpf(self.norm(x))


class ClosureLM(nn.Module):
    def __init__(self, vocab_size=256, width=32, block_size=32, n_layer=2):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, width))  # learned, (1, T, C)
        self.blocks = nn.Sequential(*(_ClosureBlock(width) for _ in range(n_layer)))
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        x = self.emb(idx) + self.pos_emb[:, :idx.shape[1]]  # (B, T, width)
        return self.head(self.blocks(x))
