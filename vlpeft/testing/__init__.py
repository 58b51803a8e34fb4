"""Helpers for vlpeft's tests: the tiny models and synthetic images of :mod:`vlpeft.models.tiny` under their
former import paths, and :mod:`vlpeft.testing.coverage` (which model families each method reaches).

Library code imports :mod:`vlpeft.models.tiny` directly; this package only keeps ``vlpeft.testing``,
``vlpeft.testing.tiny_models``, ``vlpeft.testing.images`` and ``vlpeft.testing.twins`` working.
"""

from vlpeft.models.tiny import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    FAMILIES,
    FIRST_TEXT_TOKEN_ID,
    GENERATIVE_FAMILIES,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyModel,
    build_tiny_model,
    images_to_pixel_values,
    random_pixel_values,
    tiny_images,
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
