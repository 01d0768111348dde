"""A Llama-3 style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Written so that ``torch.fx.symbolic_trace`` can trace it: shapes are read one dimension at a time
(``x.size(0)``, never ``b, t = x.shape``) and nothing branches on a shape or a tensor value. The
rotary tables are real ``cos``/``sin`` buffers rather than complex numbers, so the model also builds
and runs on the meta device: ``with torch.device("meta"): Transformer(LlamaConfig.llama3_405b())``
takes about a second and allocates nothing.

No rope scaling (Llama 3.1's long-context extension) and no KV cache: ``generate`` recomputes the
whole prefix for every new token.

Run ``python examples/llama.py`` to build a tiny one, run it and generate a few tokens.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8  # < n_heads: grouped-query attention, n_heads // n_kv_heads queries share a k/v head
    vocab_size: int = 128256
    multiple_of: int = 1024  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = False  # the output head shares tok_embeddings' weight (Llama 3.2 1B and 3B do)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """SwiGLU hidden size: 2/3 of 4*dim (so its three matrices cost what two 4*dim ones would),
        times ffn_dim_multiplier, rounded up to multiple_of. 8B: 14336; 405B: 53248."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def tiny(cls, **overrides):
        """About 130k parameters: for tests and quick runs on a CPU."""
        return cls(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                             ffn_dim_multiplier=None, max_seq_len=128), **overrides})

    @classmethod
    def llama3_8b(cls, **overrides):
        """Llama 3 8B: 8,030,261,248 parameters."""
        return cls(**{**dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
                      **overrides})

    @classmethod
    def llama3_405b(cls, **overrides):
        """Llama 3.1 405B: 405,853,388,800 parameters (the 8k context of pretraining, no rope scaling)."""
        return cls(**{**dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                             ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
                      **overrides})

    @classmethod
    def llama31_70b(cls, **overrides):
        """Llama 3.1 70B: 70,553,706,496 parameters (the 8k context of pretraining, no rope scaling)."""
        return cls(**{**dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
                      **overrides})

    @classmethod
    def llama32_1b(cls, **overrides):
        """Llama 3.2 1B: 1,235,814,400 parameters, its output head tied to the token embedding (8k context, no
        rope scaling). Its SwiGLU hidden size: 1.5 x 5461, rounded up to a multiple of 256, is 8192."""
        return cls(**{**dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                             ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                             tie_embeddings=True), **overrides})


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(head_dim, max_seq_len, theta):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), on the current default device."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hd/2,)
    t = torch.arange(max_seq_len).float()  # (max_seq_len,)
    angles = torch.outer(t, freqs)  # (max_seq_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by position * freq_i, as Meta's Llama does.

    Meta's code views the pairs as complex numbers and multiplies by exp(i * angle); this is the
    same product written out in real numbers. x: (B, T, n, hd); cos, sin: (T, hd/2).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, n, hd/2, 2)
    x_re, x_im = xf[..., 0], xf[..., 1]  # (B, T, n, hd/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2): broadcast over batch and heads
    out = torch.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1)  # (B, T, n, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, n, hd)


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention: n_kv_heads k/v heads serve n_heads query heads."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin):
        bsz, seqlen = x.size(0), x.size(1)
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)

        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, nkv, T, hd)
        v = v.transpose(1, 2)  # (B, nkv, T, hd)
        # enable_gqa: each group of n_heads // n_kv_heads query heads attends with one k/v head
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, self.n_heads * self.head_dim)  # (B, T, nh * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Tokens (B, T) -> logits (B, T, vocab_size).

    >>> model = Transformer(LlamaConfig.tiny())
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 256])
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # tied only if the config says so
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

        # Computed on the device the model is built on (meta included); derived from the config,
        # so kept out of the state_dict.
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("sin", sin, persistent=False)  # (max_seq_len, hd/2)

    def forward(self, tokens):
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos = self.cos[:seqlen]  # (T, hd/2)
        sin = self.sin[:seqlen]  # (T, hd/2)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        return self.output(h)  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, greedy=True, temperature=1.0):
        """Extend ``tokens`` (B, T) by ``max_new_tokens``: argmax if ``greedy``, else sample at ``temperature``.

        No KV cache: every step runs the whole prefix (cropped to max_seq_len) through the model.
        Returns (B, T + max_new_tokens).
        """
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.config.max_seq_len :])[:, -1, :]  # (B, vocab_size)
            if greedy:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                next_token = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)  # (B, T + 1)
        return tokens


if __name__ == "__main__":
    torch.manual_seed(0)
    config = LlamaConfig.tiny()
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Llama tiny ({n_params:,} parameters): tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")
    out = model.generate(tokens, max_new_tokens=8)
    print(f"generate(max_new_tokens=8): {tuple(tokens.shape)} -> {tuple(out.shape)}")
