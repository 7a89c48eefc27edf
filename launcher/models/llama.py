"""The built-in Llama-style decoder (``model: {name: llama, ...}``): pre-norm RMSNorm blocks, rotary positions,
grouped-query causal attention through ``scaled_dot_product_attention``, a SwiGLU MLP, no biases; a language
model, so its loss is cross-entropy per token.

Its parameters carry Hugging Face's ``LlamaForCausalLM`` layout (q/k/v/o and gate/up/down projections, rotary
in the half-split convention), so an export is a renaming (:func:`to_hf`), never a permutation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.errors import RecipeError, at_least, one_of

NAMES = ("llama",)
LANGUAGE_MODEL = True                    # a loss per token, masked targets (-100) left out; no accuracy
ACTIVATION_CHECKPOINTING = True          # performance.activation_checkpointing: per block
SHARD_UNITS = ("LlamaBlock",)            # FSDP: each block a unit of its own, then the root


@dataclass
class Settings:
    """A Llama-style decoder. ``kv_heads``: the key/value heads grouped-query attention shares among the
    ``heads`` (null: as many as heads); ``ffn_width``: the SwiGLU's hidden width (null: Llama's 8/3 width,
    rounded up to a multiple of 32)."""
    name: str = "llama"
    layers: int = 2
    heads: int = 4
    kv_heads: Optional[int] = None
    width: int = 64                     # the model dimension (a multiple of heads; the head size even)
    ffn_width: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    seq_len: Optional[int] = None       # default: data.seq_len
    vocab: Optional[int] = None         # default: the data's vocabulary


def ffn_width(s: Settings) -> int:
    return s.ffn_width or 32 * math.ceil(8 * s.width / 3 / 32)


def check(r) -> None:
    """Positive sizes; width a multiple of heads with an even head size (rotary pairs), heads a multiple of
    kv_heads; token data (or a factory's windows) and its own loss."""
    m = r.model
    one_of("model.name", m.name, NAMES)
    for key in ("layers", "heads", "width"):
        at_least(f"model.{key}", getattr(m, key), 1)
    if m.width % m.heads or (m.width // m.heads) % 2:
        raise RecipeError(f"model.width: {m.width!r} is not valid; allowed: a multiple of model.heads ({m.heads}) "
                          "whose head size is even (rotary positions turn pairs)")
    if m.kv_heads is not None:
        at_least("model.kv_heads", m.kv_heads, 1)
        if m.heads % m.kv_heads:
            raise RecipeError(f"model.kv_heads: {m.kv_heads!r} is not valid; allowed: a divisor of model.heads "
                              f"({m.heads})")
    for key, low in (("ffn_width", 1), ("seq_len", 1), ("vocab", 2)):
        if getattr(m, key) is not None:
            at_least(f"model.{key}", getattr(m, key), low)
    for key in ("rope_theta", "norm_eps"):
        value = getattr(m, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise RecipeError(f"model.{key}: {value!r} is not valid; allowed: a number > 0")
    if r.data.factory is None and r.data.dataset != "tokens":
        raise RecipeError(f"model.name: 'llama' is not valid with data.dataset {r.data.dataset!r}; allowed: "
                          "data.dataset tokens, or a data.factory giving (tokens, next tokens) windows")
    if r.loss.factory is not None:
        raise RecipeError(f"loss.factory: {r.loss.factory!r} is not valid with the built-in llama; allowed: null (its "
                          "loss is cross-entropy per token, masked targets -100 left out)")


def build(settings: Settings, shape: tuple, vocab: int | None) -> "Llama":
    """The recipe's model: its seq_len and vocabulary default to the data's (a sample's length, its ids)."""
    s = settings
    return Llama(vocab=s.vocab or vocab, seq_len=s.seq_len or shape[0], layers=s.layers, heads=s.heads,
                 kv_heads=s.kv_heads or s.heads, width=s.width, ffn_width=ffn_width(s), rope_theta=s.rope_theta,
                 norm_eps=s.norm_eps, tie_embeddings=s.tie_embeddings)


def flops_per_token(model: "Llama") -> float:
    """Training FLOPs per token (forward and backward): 6 N for the N parameters that multiply (the
    projections and the output head; not the embedding, a lookup, unless it is tied to the head, where it
    counts once) plus 12 L T d for attention's two products over the T positions (every query head attends,
    grouped or not; PaLM's appendix B)."""
    multiplying = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "tokens.weight")
    if model.head.weight is model.tokens.weight:
        multiplying += model.head.weight.numel()
    return 6 * multiplying + 12 * len(model.blocks) * model.seq_len * model.width


def rotary(seq_len: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_size) of rotary positions in the half-split convention (the head's first half
    pairs with its second, as Hugging Face's Llama), frequencies theta^(-2i/head_size), in float32."""
    inverse = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_size) turned by its positions' angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_size = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, heads * self.head_size, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_size, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_size, bias=False)
        self.o_proj = nn.Linear(heads * self.head_size, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_size).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        q, k = turn(q, cos, sin), turn(k, cos, sin)
        if self.kv_heads != self.heads:            # each key/value head serves heads / kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_size))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm: x + attention(rmsnorm(x)), then x + SwiGLU(rmsnorm(x))."""

    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(width, eps=eps)
        self.self_attn = LlamaAttention(width, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(width, eps=eps)
        self.mlp = LlamaMLP(width, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, a final RMSNorm and the output head (tied to the embedding
    with ``tie_embeddings``). Inputs (B, T) ids, outputs (B, T, vocab) logits.

    Initialisation, GPT-2's scheme (Radford et al. 2019, as the built-in GPT): every matrix normal(0, 0.02),
    the two projections into the residual stream (o_proj, down_proj) normal(0, 0.02 / sqrt(2 layers)), since
    each block adds two; norms' weights 1. ``checkpointing``: each block's activations are recomputed in the
    backward pass (torch's non-reentrant checkpoint) rather than kept."""

    def __init__(self, vocab: int, seq_len: int, layers: int = 2, heads: int = 4, kv_heads: int = 4, width: int = 64,
                 ffn_width: int = 192, rope_theta: float = 10000.0, norm_eps: float = 1e-5, tie_embeddings: bool = False):
        super().__init__()
        self.seq_len, self.width, self.checkpointing = seq_len, width, False
        self.tokens = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(LlamaBlock(width, heads, kv_heads, ffn_width, norm_eps) for _ in range(layers))
        self.norm = nn.RMSNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.tokens.weight
        cos, sin = rotary(seq_len, width // heads, rope_theta)
        self.register_buffer("cos", cos, persistent=False)     # derived from the settings: not in a state dict
        self.register_buffer("sin", sin, persistent=False)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.seq_len:
            raise ValueError(f"a sequence of {T} tokens is longer than the model's seq_len {self.seq_len}")
        x = self.tokens(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.head(self.norm(x))


def to_hf(settings: Settings, state: dict, seq_len: int | None) -> tuple:
    """(transformers' LlamaConfig, LlamaForCausalLM's state dict) of this model's ``state``: the parameters
    already have its layout (rotary in the half-split convention, q/k/v/o, gate/up/down), so only the names
    change; its attention and MLP without biases, SiLU, RMSNorm eps and rope theta as here."""
    import re

    from transformers import LlamaConfig
    vocab, width = state["tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    s = settings
    config = LlamaConfig(vocab_size=int(vocab), hidden_size=int(width), intermediate_size=ffn_width(s),
                         num_hidden_layers=layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads or s.heads,
                         max_position_embeddings=int(s.seq_len or seq_len or 2048), rope_theta=float(s.rope_theta),
                         rms_norm_eps=float(s.norm_eps), tie_word_embeddings=bool(s.tie_embeddings),
                         attention_bias=False, mlp_bias=False, hidden_act="silu", architectures=["LlamaForCausalLM"])
    names = {"tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    out = {names.get(k) or re.sub(r"^blocks\.(\d+)\.", r"model.layers.\1.", k): v for k, v in state.items()}
    if s.tie_embeddings:
        out.pop("lm_head.weight", None)         # the same tensor as the embedding: transformers ties it
    return config, out
