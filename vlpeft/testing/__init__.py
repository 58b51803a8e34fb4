"""Tiny random-config models and synthetic images for tests, examples and the demo (no downloads)."""

from vlpeft.testing.images import images_to_pixel_values, random_pixel_values, tiny_images
from vlpeft.testing.tiny_models import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    FAMILIES,
    FIRST_TEXT_TOKEN_ID,
    GENERATIVE_FAMILIES,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyModel,
    build_tiny_model,
)

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "FAMILIES",
    "FIRST_TEXT_TOKEN_ID",
    "GENERATIVE_FAMILIES",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "TinyModel",
    "build_tiny_model",
    "images_to_pixel_values",
    "random_pixel_values",
    "tiny_images",
]
