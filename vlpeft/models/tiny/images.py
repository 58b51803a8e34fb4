"""Synthetic images for tests and demos: deterministic, distinct, and cheap to make.

Nothing here downloads data. Images are drawn with PIL from a seeded random generator, so every call with the
same arguments gives the same pixels, and different indices give visibly different images.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["tiny_images", "images_to_pixel_values", "random_pixel_values"]


def tiny_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """Draw ``n`` distinct RGB images of ``size`` x ``size`` pixels.

    Each image has a random background colour and one to three random rectangles or ellipses.

    Args:
        n: number of images (>= 1).
        size: edge length in pixels (>= 4).
        seed: seed of the generator; image ``i`` depends on ``seed`` and ``i`` only.
    """
    if n < 1:
        raise ValueError(f"tiny_images: n must be >= 1, got {n}")
    if size < 4:
        raise ValueError(f"tiny_images: size must be >= 4 pixels, got {size}")
    images = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        background = tuple(int(c) for c in rng.integers(0, 256, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, size=2))
            x1, y1 = (int(v) for v in rng.integers(size // 2, size, size=2))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
            else:
                draw.ellipse([x0, y0, x1, y1], fill=colour)
        images.append(image)
    return images


def images_to_pixel_values(
    images: list[Image.Image],
    size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Resize, rescale to [0, 1] and normalise PIL images into a (batch, 3, size, size) float tensor."""
    if not images:
        raise ValueError("images_to_pixel_values: got an empty list of images")
    arrays = []
    for image in images:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def random_pixel_values(batch_size: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Normalised pixel values (batch, 3, image_size, image_size) of distinct synthetic images."""
    return images_to_pixel_values(tiny_images(batch_size, image_size, seed=seed), image_size)
