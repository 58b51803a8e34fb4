"""The CLIP-BART composite (:class:`~vlpeft.models.ClipBartForConditionalGeneration`), written out.

Derivation (:mod:`vlpeft.glue.derive`) gets it wrong (checked): BART's cross-attention is named ``encoder_attn`` (no
cross-attention word), so derived layouts miss it; ``get_decoder()`` names only the BART decoder, so the encoder
lands in an ``other`` tower, off the language side; and with no image token and no projector-like name, x_R would be
read as placeholder rows that do not exist.

- towers: the CLIP vision encoder (frozen; not adapted by default), the BART encoder and the BART decoder; the
  language towers (default targets) are the encoder and the decoder;
- x_R: the output of ``visual_embedding``, the (batch, n_images * num_visual_tokens, d_model) visual tokens (36 per
  image by default; NLVR2's pair gives 72); it runs once per forward (and once per ``generate``, before decoding),
  and routing pools it per sample (``mean`` over all of the sample's visual tokens, both images included, or keeps
  all of them for ``matmul``) in every adapted encoder and decoder layer.
"""

from __future__ import annotations

from vlpeft.glue.description import ModelFamily, Tower
from vlpeft.glue.known.layouts import LAYER_LAYOUTS

CLIP_BART = ModelFamily(
    name="clip_bart",
    class_names=("ClipBartForConditionalGeneration",),
    towers=(
        Tower("vision", "vision_model.", LAYER_LAYOUTS["clip_vision"], "vision_config", "vision"),
        Tower("text_encoder", "language_model.model.encoder.", LAYER_LAYOUTS["bart"], "text_config", "text"),
        Tower("text_decoder", "language_model.model.decoder.", LAYER_LAYOUTS["bart"], "text_config", "text"),
    ),
    language_towers=("text_encoder", "text_decoder"),
    visual_feature_module="visual_embedding",
    visual_feature_output="tensor",
)

FAMILIES = (CLIP_BART,)
