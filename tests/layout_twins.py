"""Twins of the field's checkpoint layouts, written from their descriptions
(issue: the field's checkpoint layouts), shared by tests/test_layouts.py and
usable as ``--template tests/layout_twins.py:BUILDER`` on the command line."""

from __future__ import annotations

import torch
from torch import nn


class RotateHalfAttention(nn.Module):
    """A twin of the papers' bilinear attention, written from its description:
    q1, k1, q2, k2, v, o nn.Linear(d, d), heads by reshape, scores
    (q1.k1)(q2.k2) / d_head^2, causal, rotary (rotate-half), out = x +
    attn_scale * o(z)."""

    def __init__(self, d, n_head, attn_scale, bias_qk, interleaved=False):
        super().__init__()
        self.n_head, self.dh, self.attn_scale, self.interleaved = n_head, d // n_head, attn_scale, interleaved
        for name in ("q1", "k1", "q2", "k2"):
            setattr(self, name, nn.Linear(d, d, bias=bias_qk))
        self.v, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def rope(self, t):  # (b, n, h, dh), rotate-half (or interleaved: pairs 2k, 2k + 1)
        n, dh = t.shape[1], self.dh
        inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=t.dtype) / dh)
        ang = torch.arange(n, dtype=t.dtype)[:, None] * inv[None]  # (n, dh/2)
        if self.interleaved:
            c, s, x0, x1 = ang.cos()[None, :, None], ang.sin()[None, :, None], t[..., 0::2], t[..., 1::2]
            return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
        cos, sin = torch.cat([ang.cos()] * 2, -1)[None, :, None], torch.cat([ang.sin()] * 2, -1)[None, :, None]
        rot = torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1)
        return t * cos + rot * sin

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.n_head, self.dh)  # noqa: E731
        q1, k1, q2, k2 = (self.rope(split(getattr(self, m)(x))) for m in ("q1", "k1", "q2", "k2"))
        s = torch.einsum("bihe,bjhe->bhij", q1, k1) * torch.einsum("bihe,bjhe->bhij", q2, k2) / self.dh**2
        s = s * torch.tril(torch.ones(n, n, dtype=x.dtype))
        z = torch.einsum("bhij,bjhe->bihe", s, split(self.v(x))).reshape(b, n, d)
        return x + self.attn_scale * self.o(z)


class FinalNorm(nn.Module):  # an eval-time gain with an input-independent scale buffer
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.register_buffer("scale", torch.tensor(1.7))

    def forward(self, x):
        return x * self.weight / self.scale


class PaperLM(nn.Module):
    def __init__(self, vocab, d, n_head, n_layers, attn_scale, bias_qk, interleaved=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(RotateHalfAttention(d, n_head, attn_scale, bias_qk, interleaved)
                                    for _ in range(n_layers))
        self.final_norm = FinalNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.unembed(self.final_norm(x))


class _ChunkedMLP(nn.Module):
    """The image models' bilinear MLP: one nn.Linear(d, 2h) chunked into left
    and right halves (``w``), then the projection ``p``."""

    def __init__(self, d, h):
        super().__init__()
        self.w, self.p = nn.Linear(d, 2 * h), nn.Linear(h, d)

    def forward(self, x):
        left, right = self.w(x).chunk(2, -1)
        return self.p(left * right)


class ImageModel(nn.Module):
    """embed, blocks[i] (chunked bilinear MLPs; the residual written in forward), head."""

    def __init__(self, residual=True, d_in=6, d=4, h=5, n_blocks=2, d_out=3):
        super().__init__()
        self.residual = residual
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(_ChunkedMLP(d, h) for _ in range(n_blocks))
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x) if self.residual else block(x)
        return self.head(x)


class FusedAttention(nn.Module):
    """A fused projection qkv: nn.Linear(d, 5 d) split into q1, k1, q2, k2, v
    per head, each score divided by sqrt(d_head), then o, with a residual."""

    def __init__(self, d=8, n_head=2, rotary="rotate_half", causal=True):
        super().__init__()
        self.n_head, self.dh, self.rotary, self.causal = n_head, d // n_head, rotary, causal
        self.qkv, self.o = nn.Linear(d, 5 * d), nn.Linear(d, d)

    def rope(self, t):
        if self.rotary is None:
            return t
        n, dh = t.shape[1], self.dh
        inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=t.dtype) / dh)
        ang = torch.arange(n, dtype=t.dtype)[:, None] * inv[None]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        if self.rotary == "rotate_half":
            x0, x1 = t[..., : dh // 2], t[..., dh // 2:]
            return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], -1)
        x0, x1 = t[..., 0::2], t[..., 1::2]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)

    def forward(self, x):
        b, n, d = x.shape
        q1, k1, q2, k2, v = (t.view(b, n, self.n_head, self.dh) for t in self.qkv(x).chunk(5, -1))
        q1, k1, q2, k2 = map(self.rope, (q1, k1, q2, k2))
        s = (torch.einsum("bihe,bjhe->bhij", q1, k1) / self.dh**0.5) * \
            (torch.einsum("bihe,bjhe->bhij", q2, k2) / self.dh**0.5)
        if self.causal:
            s = s * torch.tril(torch.ones(n, n, dtype=x.dtype))
        z = torch.einsum("bhij,bjhe->bihe", s, v).reshape(b, n, d)
        return x + self.o(z)


class GatedMLP(nn.Module):
    """transformers' LlamaMLP without the activation: a bilinear layer."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.down_proj = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.up_proj(x))


class HeldFactors(nn.Module):
    """A bilinear layer holding nn.Parameter factors (out, in) or (in, out)."""

    def __init__(self, stored="out_in"):
        super().__init__()
        self.stored = stored
        shape = (lambda o, i: (o, i)) if stored == "out_in" else (lambda o, i: (i, o))
        self.left, self.right = nn.Parameter(torch.randn(*shape(6, 4))), nn.Parameter(torch.randn(*shape(6, 4)))
        self.left_bias = nn.Parameter(torch.randn(6))
        self.down = nn.Parameter(torch.randn(*shape(3, 6)))

    def forward(self, x):
        lin = (lambda W, x: x @ W.T) if self.stored == "out_in" else (lambda W, x: x @ W)  # noqa: E731
        return lin(self.down, (lin(self.left, x) + self.left_bias) * lin(self.right, x))


# builders for --template tests/layout_twins.py:NAME (the layouts as saved, float32)
BUILDERS = {
    "image_model": ImageModel,
    "fused_attention": FusedAttention,
    "gated_mlp": GatedMLP,
    "held_factors": HeldFactors,
}
image_model, fused_attention, gated_mlp, held_factors = (BUILDERS[k] for k in BUILDERS)
