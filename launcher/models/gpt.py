"""The built-in GPT (``model: {name: gpt, ...}``): pre-norm blocks, causal attention (scaled_dot_product_attention),
tied embeddings; a language model, so its loss is cross-entropy per token."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.errors import RecipeError, at_least, one_of

NAMES = ("gpt",)
LANGUAGE_MODEL = True                    # a loss per token, masked targets (-100) left out; no accuracy
ACTIVATION_CHECKPOINTING = True          # performance.activation_checkpointing: per block
SHARD_UNITS = ("Block",)                 # FSDP: each block a unit of its own, then the root


@dataclass
class Settings:
    """The built-in GPT: pre-norm blocks, causal attention (scaled_dot_product_attention), tied embeddings."""
    name: str = "gpt"
    layers: int = 2
    heads: int = 2
    width: int = 64                     # the model dimension (a multiple of heads)
    seq_len: Optional[int] = None       # default: data.seq_len
    vocab: Optional[int] = None         # default: the data's vocabulary


def check(r) -> None:
    """Positive sizes, width a multiple of heads, seq_len and vocab from the data where not given; token data
    (or a factory's windows) and its own loss."""
    g = r.model
    one_of("model.name", g.name, NAMES)
    for key in ("layers", "heads", "width"):
        at_least(f"model.{key}", getattr(g, key), 1)
    if g.width % g.heads:
        raise RecipeError(f"model.width: {g.width!r} is not valid; allowed: a multiple of model.heads ({g.heads})")
    for key in ("seq_len", "vocab"):
        if getattr(g, key) is not None:
            at_least(f"model.{key}", getattr(g, key), 2 if key == "vocab" else 1)
    if r.data.factory is None and r.data.dataset != "tokens":
        raise RecipeError(f"model.name: 'gpt' is not valid with data.dataset {r.data.dataset!r}; allowed: "
                          "data.dataset tokens, or a data.factory giving (tokens, next tokens) windows")
    if r.loss.factory is not None:
        raise RecipeError(f"loss.factory: {r.loss.factory!r} is not valid with the built-in GPT; allowed: null (its "
                          "loss is cross-entropy per token, masked targets -100 left out)")


def flops_per_token(model: "GPT") -> float:
    """Training FLOPs per token (forward and backward) of the built ``model``: 6 N for the N parameters that
    multiply (every one but the position embedding, which is only added; the tied embedding counts once, as
    the output projection) plus 12 L T d for attention's two products over the T positions (PaLM's
    appendix B; nanoGPT's estimate_mfu), T the model's seq_len."""
    n = sum(p.numel() for p in model.parameters()) - model.positions.weight.numel()
    return 6 * n + 12 * len(model.blocks) * model.seq_len * model.tokens.weight.shape[1]


def build(settings: Settings, shape: tuple, vocab: int | None) -> "GPT":
    """The recipe's GPT: its seq_len and vocabulary default to the data's (a sample's length, its ids)."""
    return GPT(vocab=settings.vocab or vocab, seq_len=settings.seq_len or shape[0], layers=settings.layers,
               heads=settings.heads, width=settings.width)


def to_hf(settings: Settings, state: dict, seq_len: int | None) -> tuple:
    """(transformers' GPT2Config, GPT2LMHeadModel's state dict) of this model's ``state``: the same numbers,
    GPT-2's names, and its Conv1D layout (weights stored (in, out): transposed); exact GELU, LayerNorm eps 1e-5,
    the output projection tied to the token embedding, as here."""
    from transformers import GPT2Config
    vocab, width = state["tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    config = GPT2Config(vocab_size=int(vocab), n_positions=int(state["positions.weight"].shape[0]), n_embd=int(width),
                        n_layer=layers, n_head=settings.heads, n_inner=4 * int(width), activation_function="gelu",
                        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])
    out = {"transformer.wte.weight": state["tokens.weight"], "transformer.wpe.weight": state["positions.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    ours = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
            "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}
    for i in range(layers):
        for theirs, mine in ours.items():
            weight, bias = state[f"blocks.{i}.{mine}.weight"], state[f"blocks.{i}.{mine}.bias"]
            conv1d = not theirs.startswith("ln_")
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t().contiguous() if conv1d else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = bias
    return config, out


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + MLP(norm(x)) (4x width, GELU)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: token and learned position embeddings, ``layers`` pre-norm blocks, a final
    norm, and the output projection tied to the token embedding. Inputs (B, T) token ids, outputs (B, T,
    vocab) logits. GPT-2's initialisation: normal(0, 0.02) weights, zero biases, and the projections into
    the residual stream scaled by 1/sqrt(2 layers) (each block adds two). ``blocks`` is what a sharded
    engine wraps one by one. ``checkpointing``: each block's activations are recomputed in the backward
    pass (torch's non-reentrant checkpoint) rather than kept."""

    def __init__(self, vocab: int, seq_len: int, layers: int = 2, heads: int = 2, width: int = 64):
        super().__init__()
        self.seq_len, self.checkpointing = seq_len, False
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight                  # tied
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.seq_len:
            raise ValueError(f"a sequence of {T} tokens is longer than the model's seq_len {self.seq_len}")
        x = self.tokens(ids) + self.positions(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and torch.is_grad_enabled() else block(x)
        return self.head(self.norm(x))
