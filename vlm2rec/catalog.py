"""The item catalogue the embedders read (one title and one image per item) and image loading.

Robustness scenarios (§13.3) edit a copy of a `Catalog`; `fingerprint()` keys the embedding cache by
content, so an edited catalogue never reuses the clean one's embeddings. Every key an image contributes
(`image_key`) holds the SHA-1 of the file's bytes, never its path: a replaced or repaired poster gets
fresh features and embeddings.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PLACEHOLDER_GREY = (128, 128, 128)  # neutral: no colour cue for a missing image (§14.1)
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def equal_area(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the aspect ratio of width x height and about the area of a size x size square (each
    side >= 1); a square maps to exactly (size, size)."""
    scale = size / (width * height) ** 0.5
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(path: Path | None, size: int, keep_aspect: bool = False) -> Image.Image:
    """RGB image resized to size x size, or with `keep_aspect` to the equal-area size of its own aspect
    ratio (the Qwen processor then fits it to its pixel budget without distorting it, §5.1); a grey
    size x size placeholder for None or an unreadable file."""
    if path is not None:
        try:
            with Image.open(path) as img:
                target = equal_area(*img.size, size) if keep_aspect else (size, size)
                return img.convert("RGB").resize(target, Image.Resampling.BICUBIC)
        except IMAGE_ERRORS as err:
            warnings.warn(f"unreadable image {path} ({err}); using the grey placeholder", stacklevel=2)
    return Image.new("RGB", (size, size), PLACEHOLDER_GREY)


def is_valid_image(path: Path) -> bool:
    """True when Pillow can fully decode the file (used for resume and for dropping corrupt files)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except IMAGE_ERRORS:
        return False


def file_digest(path: Path | None) -> str:
    """SHA-1 of a file's bytes; "none" for no file and "missing" for a path that does not exist (both
    are drawn as the grey placeholder, which is what the key then stands for)."""
    if path is None:
        return "none"
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha1").hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return "missing"


def history_items(row: torch.Tensor) -> list[int]:
    """The item ids of one left-padded history row, oldest first (0 = padding, dropped)."""
    return [int(i) for i in row.tolist() if i > 0]


@dataclass
class Catalog:
    """Item content seen by the embedder; index 0 is the padding item."""
    titles: list[str]
    images: list[Path | None]
    image_size: int
    noisy: frozenset = field(default_factory=frozenset)   # item ids whose image gets Gaussian noise
    noise_std: float = 0.0
    keep_aspect: bool = False          # equal-area resize keeping the aspect ratio (VLM backbones), else square
    _loaded: dict = field(default_factory=dict, init=False, repr=False, compare=False)   # decoded images
    _digests: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # item -> file_digest

    def image(self, item: int) -> Image.Image:
        if item not in self._loaded:
            self._loaded[item] = load_image(self.images[item], self.image_size, self.keep_aspect)
        image = self._loaded[item]
        if item in self.noisy:        # per-item seed: the same noisy image every time it is drawn
            rng = np.random.default_rng([int(item), 7])
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 255 * self.noise_std, (*image.size[::-1], 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return image

    def image_key(self, item: int) -> str:
        """What item's image input is made of: the file's content digest, the side it is resized to (and
        whether its aspect ratio is kept), and the noise it gets (seeded by the item id). Equal keys give equal pixels (digests are read once per Catalog object, and a
        scenario copy starts with none)."""
        if item not in self._digests:
            self._digests[item] = file_digest(self.images[item])
        noise = f"|noise={self.noise_std}@{item}" if item in self.noisy else ""   # the noise is seeded by item
        aspect = "|aspect" if self.keep_aspect else ""                     # other pixels, other key
        return f"{self._digests[item]}|{self.image_size}{aspect}{noise}"

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for item in range(len(self.titles)):
            digest.update(f"{self.titles[item]}\x00{self.image_key(item)}\x01".encode())
        return digest.hexdigest()[:12]
