"""Former path of the tiny families: they live in :mod:`vlpeft.models.tiny` (re-exported here for the tests)."""

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
)

__all__ = [
    "FAMILIES",
    "GENERATIVE_FAMILIES",
    "PAD_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "FIRST_TEXT_TOKEN_ID",
    "TinyModel",
    "build_tiny_model",
]
