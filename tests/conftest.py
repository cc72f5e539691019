"""Shared fixtures: small, seeded, randomly initialised models (no downloads) to wrap with HyperLoRA."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
from torch import nn

# One intra-op thread per test process: `pytest -n 2` on 2 cores runs two workers, and two torch thread pools
# spinning on the same cores make small ops hundreds of times slower.
torch.set_num_threads(1)

# --- models ----------------------------------------------------------------------------------------------------------

# The 1x1 convolutions of SmallCNN: what HyperLoRA can adapt there (``conv`` is 3x3 and cannot be adapted).
CNN_TARGETS = ["pw1", "pw2", "pw3"]


class SmallCNN(nn.Module):
    """A 3x3 stem, then pointwise (1x1) convolutions: plain, strided, and zero-padded; then a linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pw1 = nn.Conv2d(8, 16, kernel_size=1)
        self.pw2 = nn.Conv2d(16, 16, kernel_size=1, stride=2)
        self.pw3 = nn.Conv2d(16, 8, kernel_size=1, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.pw1(x))
        x = torch.relu(self.pw2(x))
        x = self.pw3(x)
        return self.head(x.mean(dim=(-2, -1)))


# The 1x1 convolutions of BatchNormCNN.
BN_CNN_TARGETS = ["pw1", "pw2"]


class BatchNormCNN(nn.Module):
    """A feature extractor with BatchNorm, like EfficientNet: a 3x3 conv-BN stem, then 1x1 conv-BN blocks; returns
    pooled (batch, 16) features. A forward in train mode changes its running statistics."""

    # what hyperlora.data.image_spec reads: 16 px inputs
    pretrained_cfg: ClassVar[dict] = {"input_size": (3, 16, 16)}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.pw1 = nn.Conv2d(8, 16, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw2 = nn.Conv2d(16, 16, kernel_size=1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.pw1(x)))
        x = self.bn2(self.pw2(x))
        return x.mean(dim=(-2, -1))


def build_bn_cnn(seed: int = 0) -> nn.Module:
    """A fresh BatchNormCNN in train mode, as a user builds it; its BN statistics are set away from the 0/1 defaults
    (as pretrained ones are), so that any update to them shows."""
    torch.manual_seed(seed)
    model = BatchNormCNN()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def build_timm_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A 2-block timm ViT-Tiny on 32x32 inputs (16 patches of 8x8), random weights, eval mode."""
    import timm

    torch.manual_seed(seed)
    options = dict(pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    options.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def build_hf_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A 1-layer transformers ViTModel (hidden 32) on 32x32 inputs, random weights, eval mode."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    options = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    options.update(kwargs)
    return ViTModel(ViTConfig(**options)).eval()


def build_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().eval()


@pytest.fixture
def make_timm_vit() -> Callable[..., nn.Module]:
    """Factory: every call with the same seed returns a fresh model with identical weights."""
    return build_timm_vit


@pytest.fixture
def make_hf_vit() -> Callable[..., nn.Module]:
    return build_hf_vit


@pytest.fixture
def make_cnn() -> Callable[..., nn.Module]:
    return build_cnn


@pytest.fixture
def timm_vit() -> nn.Module:
    return build_timm_vit()


@pytest.fixture
def hf_vit() -> nn.Module:
    return build_hf_vit()


@pytest.fixture
def small_cnn() -> nn.Module:
    return build_cnn()


# --- inputs ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def vit_images() -> torch.Tensor:
    """A batch of four 32x32 RGB images for the ViT fixtures."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def cnn_images() -> torch.Tensor:
    """A batch of four 16x16 RGB images for SmallCNN."""
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
