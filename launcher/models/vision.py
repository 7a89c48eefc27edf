"""The image classifiers: ResNet-18 with the CIFAR stem, a ViT-Tiny for small images (both torchvision's),
and a small CNN. Named by a string (``model: resnet18``); no settings of their own.

The small CNN has no batch norm, so its gradient of a global batch is the same however the batch is cut into
micro-batches and ranks; that is what the exact equivalence tests rely on. ResNet-18's batch norm makes its
statistics depend on the micro-batch (as in every data-parallel trainer).
"""
from __future__ import annotations

from torch import nn

Settings = None                          # named by a string: nothing to set
LANGUAGE_MODEL = False                   # class logits: a loss per sample, accuracy
SHARD_UNITS: tuple[str, ...] = ()        # FSDP: the root only


def check(recipe) -> None:
    """Nothing beyond the name (the data's shape is checked by a forward pass before any worker)."""


def build(name: str, shape: tuple, num_classes: int) -> nn.Module:
    return BUILDERS[name](shape[0], num_classes, shape[-1])


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


BUILDERS = {"small_cnn": small_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}
NAMES = tuple(BUILDERS)
