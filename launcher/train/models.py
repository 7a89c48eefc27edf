"""Models: ResNet-18 with the CIFAR stem, a ViT-Tiny for small images (both torchvision's), a small CNN,
and a GPT for token data.

The small CNN has no batch norm, so its gradient of a global batch is the same however the batch is
cut into micro-batches and ranks; that is what the exact equivalence tests rely on. ResNet-18's batch
norm makes its statistics depend on the micro-batch (as in every data-parallel trainer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def small_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    # CIFAR stem: 3x3 stride-1 first convolution and no max-pool (32x32 inputs keep their resolution)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_tiny(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision
    patch = 4 if image_size % 4 == 0 else 1
    model = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=patch, num_layers=12, num_heads=3, hidden_dim=192,
        mlp_dim=768, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, 192, kernel_size=patch, stride=patch)
    return model


DTYPES = {"fp32": torch.float32,
          # bf16 is torch.autocast over fp32 weights and data: parameters, optimizer state, inputs and
          # the loss stay fp32, only the matmuls and convolutions run in bf16 (both engines alike).
          "bf16": torch.float32,
          "fp64": torch.float64}


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
    engine wraps one by one."""

    def __init__(self, vocab: int, seq_len: int, layers: int = 2, heads: int = 2, width: int = 64):
        super().__init__()
        self.seq_len = seq_len
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
            x = block(x)
        return self.head(self.norm(x))


def gpt(spec, shape: tuple, vocab: int | None) -> GPT:
    """The recipe's GPT: its seq_len and vocabulary default to the data's (a sample's length, its ids)."""
    return GPT(vocab=spec.vocab or vocab, seq_len=spec.seq_len or shape[0], layers=spec.layers, heads=spec.heads,
               width=spec.width)


BUILDERS = {"small_cnn": small_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}


def build(spec, shape: tuple, num_classes: int, seed: int, dtype: torch.dtype) -> nn.Module:
    """The recipe's model: a built-in name, or a ModelSpec whose factory (with its kwargs) returns an
    nn.Module. The same initial weights on every rank: the init draws from the RNG seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(spec, str):
            model = BUILDERS[spec](shape[0], num_classes, shape[-1])
        elif getattr(spec, "name", None) == "gpt":
            model = gpt(spec, shape, num_classes)
        else:
            model = user_model(spec)
    return model.to(dtype)


class GlobalAvgPool(nn.Module):
    """Average over height and width (keeping them as 1 x 1): AdaptiveAvgPool2d(1)'s value, with a
    backward that is an expand. CUDA's adaptive_avg_pool2d backward accumulates with atomics, and torch
    refuses it under deterministic algorithms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


def deterministic_pooling(model: nn.Module) -> int:
    """performance.deterministic: every AdaptiveAvgPool2d to 1 x 1 (ResNet's, most CNNs') replaced by
    GlobalAvgPool, so the paper's ResNet-18 runs deterministically on CUDA; returns how many."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    for name, _ in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, GlobalAvgPool())
    return len(found)


def user_model(spec) -> nn.Module:
    from launcher.errors import UserError
    from launcher.config.factories import call
    model = call("model.factory", spec.factory, spec.kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.factory: {spec.factory!r} returned {type(model).__name__}; allowed: a torch.nn.Module")
    return model
