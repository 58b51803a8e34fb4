"""The token-id convention every tiny model shares (all ids fit the default vocabulary of 99); see
:mod:`vlpeft.models.tiny`."""

from __future__ import annotations

__all__ = ["BOS_TOKEN_ID", "EOS_TOKEN_ID", "FIRST_TEXT_TOKEN_ID", "IMAGE_TOKEN_ID", "PAD_TOKEN_ID", "SPECIAL_TOKENS"]

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 3
FIRST_TEXT_TOKEN_ID = 5

#: The special ids as config fields.
SPECIAL_TOKENS = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
