"""Models whose attention is written by hand, and models that compute their own loss, shared by the
tests (not collected: no ``test_`` prefix). Written from scratch in the conventions users bring;
the file imports nothing but torch, so tests can also copy it as a user's ``model.py``.

- :class:`MatmulGPT`: ``softmax(q @ k.T * scale)`` with a causal ``masked_fill(-inf)`` from a
  registered lower-triangular buffer, ``forward(idx, targets=None) -> (logits, loss)``;
- :class:`EinsumDecoder` / :class:`EinsumEncoder`: scores from ``torch.einsum``, a causal ``-inf``
  mask added (decoder) or none (encoder), ``Tensor.softmax``; return logits;
- :class:`LossWrapper`: ``loss = model(seq)``: shifts the sequence and computes the cross-entropy
  itself; the network inside (``self.net``) returns logits;
- :class:`LossOnlyLM`: returns the loss with no logits-returning module to fall back on;
- :class:`BrokenLossClassifier`: its own loss raises inside its "library" (the wrong loss chosen).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class _MatmulAttention(nn.Module):
    def __init__(self, width: int, heads: int, block: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))


class _Block(nn.Module):
    def __init__(self, width: int, attn: nn.Module):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(width), nn.LayerNorm(width), attn
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MatmulGPT(nn.Module):
    """Causal, attention by ``@`` and ``F.softmax``; ``forward(idx, targets=None)``."""

    def __init__(self, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32):
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(_Block(n_embd, _MatmulAttention(n_embd, n_head, block_size)) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


class _EinsumAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.to_out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1) for z in self.to_qkv(x).chunk(3, dim=-1))  # (B, T, H, D)
        dots = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5  # (B, H, T, T)
        if self.causal:
            dots = dots + torch.full((t, t), float("-inf"), device=x.device).triu(1)
        attn = dots.softmax(dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v)  # (B, T, H, D)
        return self.to_out(out.reshape(b, t, c))


class EinsumDecoder(nn.Module):
    """Causal, attention by ``einsum`` and ``Tensor.softmax``; returns logits ``(B, T, V)``."""

    causal = True

    def __init__(self, num_tokens=64, max_seq_len=16, dim=32, depth=2, heads=2):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.layers = nn.ModuleList(_Block(dim, _EinsumAttention(dim, heads, self.causal)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x):
        h = self.token_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            h = layer(h)
        return self.to_logits(self.norm(h))


class EinsumEncoder(EinsumDecoder):
    """Bidirectional: the same layers with no mask."""

    causal = False


class LossWrapper(nn.Module):
    """``loss = model(seq)``: predicts ``seq[:, 1:]`` from ``seq[:, :-1]`` through ``self.net``."""

    def __init__(self, net: nn.Module | None = None):
        super().__init__()
        self.net = net if net is not None else EinsumDecoder()

    def forward(self, seq):
        inp, target = seq[:, :-1], seq[:, 1:]
        logits = self.net(inp)  # (B, T-1, V)
        return F.cross_entropy(logits.transpose(1, 2), target)


class LossOnlyLM(nn.Module):
    """Returns the loss; its layers are plain attributes, none of which returns logits alone."""

    def __init__(self, vocab_size=64, width=32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, seq):
        logits = self.head(torch.tanh(self.mix(self.emb(seq[:, :-1]))))
        return F.cross_entropy(logits.transpose(1, 2), seq[:, 1:])


def _chosen_loss(problem_type: str):
    """A library's loss picker with an upstream bug: a classifier gets the multi-label loss."""
    return nn.BCEWithLogitsLoss() if problem_type else nn.CrossEntropyLoss()


class BrokenLossClassifier(nn.Module):
    """``forward(ids, labels=None)`` whose own loss raises: integer labels into a multi-label loss."""

    def __init__(self, vocab_size=64, width=16, num_classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids, labels=None):
        logits = self.head(self.emb(ids).mean(1))  # (B, C)
        if labels is None:
            return {"logits": logits}
        return {"loss": _chosen_loss("multi_label")(logits, labels), "logits": logits}
