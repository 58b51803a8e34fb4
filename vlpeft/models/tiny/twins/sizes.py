"""Shared tiny sizes of the twins: every twin is small enough for a CPU test in well under a second."""

from __future__ import annotations

#: Language model sizes (Llama-style fields; 4 query heads over 2 key/value heads, as grouped-query LMs).
TINY_TEXT: dict[str, int] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
}

#: Vision tower sizes (CLIP/SigLIP-style fields).
TINY_VISION: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
