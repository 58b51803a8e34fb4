"""Tiny randomly initialised vision-language models, built offline in seconds: for tests, examples, benchmarks
and the training API's ``model.tiny`` / ``model.tiny_twin``.

Two kinds, both deterministic in their seed and leaving the global torch RNG untouched:

- **tiny families** (``build_tiny_model(family)``, :data:`FAMILIES`): a model of a supported architecture with the
  tiny configuration of ``ecosystem.md`` §4 (width 32, 2 layers, 4 heads, 32x32 images with 8x8 patches,
  vocabulary 99), returned as a :class:`TinyModel` that knows how to make valid forward, training and
  ``generate()`` inputs for it (:mod:`~vlpeft.models.tiny.recipes` says what each family is,
  :mod:`~vlpeft.models.tiny.factory` builds it, :mod:`~vlpeft.models.tiny.model` makes its inputs);
- **tiny twins** of chat VLMs (:mod:`vlpeft.models.tiny.twins`: ``build_twin(name)``, ``TWINS``): the family's
  real model and processor classes with tiny configs, a word-level tokenizer and a chat template, so inputs are
  made through ``processor.apply_chat_template`` as users make them. Import that subpackage when needed: it
  imports every twin's model classes.

Token-id convention shared by every tiny family (all ids fit the vocabulary of 99;
:mod:`~vlpeft.models.tiny.tokens`):

====  =====================================================
 id   meaning
====  =====================================================
 0    padding
 1    beginning of sequence (BLIP/GIT ``[CLS]``/bos)
 2    end of sequence / separator (BLIP ``[SEP]``)
 3    image placeholder (BLIP-2, LLaVA, PaliGemma)
 4    reserved (unused by the generated inputs)
 5+   ordinary text tokens
====  =====================================================

Synthetic images (:func:`tiny_images`, :func:`random_pixel_values`) come from :mod:`~vlpeft.models.tiny.images`.
``vlpeft.testing`` re-exports all of this for the tests.
"""

from vlpeft.models.tiny.factory import build_tiny_model
from vlpeft.models.tiny.images import images_to_pixel_values, random_pixel_values, tiny_images
from vlpeft.models.tiny.model import TinyModel
from vlpeft.models.tiny.recipes import FAMILIES, GENERATIVE_FAMILIES
from vlpeft.models.tiny.tokens import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    FIRST_TEXT_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
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
