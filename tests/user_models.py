"""Models as users write them, shared by the tests (not collected: no ``test_`` prefix).

Import with ``from user_models import ...``; pytest puts ``tests/`` on ``sys.path``.
"""
import pytest
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
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(vocab_size=96, n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0, **config)
    return transformers.GPT2LMHeadModel(gpt2)
