"""Small models of each task kind, written for these tests: a bidirectional encoder with an MLM head
and key biases, an encoder-decoder that builds its own decoder inputs from ``labels``, a model of
images (no token ids), and Hugging Face BERT / T5 / ViT built from tiny configs (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, each with a bias (as BERT has);
    ``causal`` masks the future."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        source = x if memory is None else memory
        def split(y):  # (B, S, C) -> (B, H, S, C/H)
            return y.view(b, y.shape[1], self.heads, c // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and memory is None)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False, cross: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.cross = SelfAttention(width, heads) if cross else None
        self.ln3 = nn.LayerNorm(width) if cross else None
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, memory=None):
        x = x + self.attn(self.ln1(x))
        if self.cross is not None:
            x = x + self.cross(self.ln3(x), memory)
        return x + self.mlp(self.ln2(x))


class BidirectionalMLM(nn.Module):
    """A BERT-like encoder over token ids: every position sees every token; logits (B, T, V)."""

    def __init__(self, vocab_size=256, width=32, heads=2, layers=2, max_len=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V)


class TinySeq2Seq(nn.Module):
    """An encoder-decoder that, like Hugging Face seq2seq models, makes its decoder inputs from
    ``labels`` (shifted right after ``decoder_start_token_id``) and returns ``{"logits", "loss"}``."""

    decoder_start_token_id = 0

    def __init__(self, vocab_size=256, width=32, heads=2, max_len=64):
        super().__init__()
        self.vocab_size = vocab_size
        self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(max_len, width)
        self.encoder = Block(width, heads)
        self.decoder = Block(width, heads, causal=True, cross=True)
        self.head = nn.Linear(width, vocab_size)

    def embed(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, input_ids, decoder_input_ids=None, labels=None):
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("TinySeq2Seq needs decoder_input_ids or labels")
            decoder_input_ids = torch.full_like(labels, self.decoder_start_token_id)
            decoder_input_ids[:, 1:] = labels[:, :-1].clamp_min(0)
        memory = self.encoder(self.embed(input_ids))
        logits = self.head(self.decoder(self.embed(decoder_input_ids), memory))  # (B, T, V)
        loss = None if labels is None else F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return {"logits": logits, "loss": loss}


class PatchClassifier(nn.Module):
    """Takes images (B, 3, 16, 16), not token ids: a ViT-like patch embedding and a linear head."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.patches = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.head = nn.Linear(width, classes)

    def forward(self, images):
        x = self.patches(images).flatten(2).mean(-1)  # (B, width)
        return self.head(x)


class DeadLayer(nn.Module):
    """Broken: a ReLU whose bias keeps it off, so the layer before it never learns."""

    def __init__(self, vocab_size=64, width=16):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.hidden = nn.Linear(width, width)
        with torch.no_grad():
            self.hidden.bias.fill_(-1e3)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids):
        x = self.tok(ids)
        return self.head(x + self.mix(torch.relu(self.hidden(x))))


def _bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**(kw | overrides))


def tiny_bert_mlm():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(_bert_config())


def tiny_bert_classifier(num_labels=4):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config(num_labels=num_labels))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2, dropout_rate=0.0, decoder_start_token_id=0))


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              image_size=16, patch_size=8))
