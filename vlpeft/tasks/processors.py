"""Processors built offline for tiny test models, and a minimal image+text processor bundle.

Real checkpoints use ``transformers.AutoProcessor.from_pretrained(name)``; the collators accept those directly.
Tests cannot download processor files, so :func:`build_tiny_processor` assembles the *same processor classes*
(``BlipProcessor``, ``Blip2Processor``, ``LlavaProcessor``, ``PaliGemmaProcessor``, ``GitProcessor``) from

- a word-level tokenizer trained with the ``tokenizers`` library on the given texts, wrapped as a
  ``PreTrainedTokenizerFast`` whose special ids match ``vlpeft.models.tiny``: ``[PAD]`` 0, ``[BOS]`` 1 (also CLS),
  ``[EOS]`` 2 (also SEP), ``<image>`` 3, ``[UNK]`` 4, ordinary words from 5;
- the PIL image-processor classes with 32x32 output (no torchvision).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2Processor,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPImageProcessorPil,
    GitProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    ViTImageProcessorPil,
)

from vlpeft.tasks.framing import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT,
    DEFAULT_LABEL_WORDS,
)
from vlpeft.tasks.layouts import LAYOUTS, layout_for
from vlpeft.tasks.nlvr2 import DEFAULT_NLVR2_PROMPT, DEFAULT_NLVR2_WORDS

PAD, BOS, EOS, IMAGE, UNK = "[PAD]", "[BOS]", "[EOS]", "<image>", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, IMAGE, UNK)  # ids 0..4, in this order

#: Which special tokens the tokenizer itself adds around a text, per family (``InputLayout.tokenizer_style``).
#: "cls_sep": [BOS] text [EOS] (BERT-like: BLIP, GIT, BERT/RoBERTa); "bos": [BOS] text (OPT, Llama, Gemma);
#: "none": nothing (GPT-2).
TOKENIZER_STYLE: dict[str, str] = {name: layout.tokenizer_style for name, layout in LAYOUTS.items()}

#: Words of the default prompts, always added to the tokenizer's training texts.
TEMPLATE_TEXTS: tuple[str, ...] = (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT.format(hypothesis=""),
    *DEFAULT_LABEL_WORDS.values(),
    DEFAULT_NLVR2_PROMPT.format(sentence=""),
    *DEFAULT_NLVR2_WORDS.values(),
    "Question: Answer:",
    "USER: ASSISTANT:",
    "vqa: gqa: nlvr: caption:",  # VL-Adapter's task prompts
)


@dataclass
class ImageTextProcessor:
    """A tokenizer and an image processor used together (for models without a transformers processor class,
    e.g. the ViT + RoBERTa / GPT-2 composites). Collators read ``.tokenizer`` and ``.image_processor``.

    :meth:`save_pretrained` writes both into one folder (``preprocessor_config.json``, the tokenizer files and
    the marker :data:`MARKER_FILE`); :meth:`from_pretrained` reads them back offline.
    """

    image_processor: Any
    tokenizer: PreTrainedTokenizerFast

    MARKER_FILE: ClassVar[str] = "vlpeft_processor.json"

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Save the image processor and the tokenizer to ``save_directory`` (created if needed)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        marker = {"processor_class": type(self).__name__,
                  "image_processor_class": type(self.image_processor).__name__,
                  "tokenizer_class": type(self.tokenizer).__name__}
        (folder / self.MARKER_FILE).write_text(json.dumps(marker, indent=1))
        return sorted(str(f) for f in folder.iterdir())

    @classmethod
    def is_saved_in(cls, source: str | os.PathLike | None) -> bool:
        """Whether ``source`` is a local folder written by :meth:`save_pretrained`."""
        return source is not None and (Path(source) / cls.MARKER_FILE).is_file()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageTextProcessor:
        """Load a folder written by :meth:`save_pretrained` (the same image-processor class is rebuilt)."""
        folder = Path(folder)
        if not cls.is_saved_in(folder):
            raise ValueError(f"{folder} holds no {cls.MARKER_FILE}; it was not written by ImageTextProcessor")
        marker = json.loads((folder / cls.MARKER_FILE).read_text())
        image_class = getattr(transformers, marker["image_processor_class"], None)
        if image_class is None:
            raise ValueError(f"{folder}: unknown image processor class {marker['image_processor_class']!r}")
        image_processor = image_class.from_pretrained(str(folder))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        return cls(image_processor, tokenizer)

    @classmethod
    def from_parts(cls, vision: str, text: str, **kwargs: Any) -> ImageTextProcessor:
        """The vision model's image processor and the text model's (fast) tokenizer, by hub name or path."""
        return cls(AutoImageProcessor.from_pretrained(vision, **kwargs),
                   AutoTokenizer.from_pretrained(text, use_fast=True, **kwargs))


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 99, style: str = "cls_sep", image_token_attribute: bool = True
) -> PreTrainedTokenizerFast:
    """Train a lower-casing word-level tokenizer on ``texts`` (plus :data:`TEMPLATE_TEXTS`).

    Args:
        texts: training texts (questions, answers, captions, hypotheses ...).
        vocab_size: maximum vocabulary size including the 5 special tokens; every id is below it.
        style: special tokens added by ``tokenizer(text)``: ``"cls_sep"``, ``"bos"`` or ``"none"``.
        image_token_attribute: register ``<image>`` as ``tokenizer.image_token`` (LLaVA / PaliGemma processors
            read it). Blip2Processor in transformers 5 needs it *absent* (it then adds ``<image>`` itself, which
            keeps id 3 because the token already exists).

    Words beyond the vocabulary map to ``[UNK]`` (id 4).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if style not in ("cls_sep", "bos", "none"):
        raise ValueError(f"style must be 'cls_sep', 'bos' or 'none', got {style!r}")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    corpus = [*TEMPLATE_TEXTS, *texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {expected_id}")
    if style == "cls_sep":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
        )
    elif style == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
        )
    extra = {"image_token": IMAGE} if image_token_attribute else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, cls_token=BOS, sep_token=EOS,
        unk_token=UNK, extra_special_tokens=extra, model_max_length=512,
    )


def build_tiny_image_processor(kind: str, image_size: int = 32, image_seq_length: int | None = None) -> Any:
    """A PIL image processor with ``image_size`` x ``image_size`` output.

    ``kind``: ``"blip"`` (BlipImageProcessorPil), ``"clip"`` (CLIPImageProcessorPil: resize shortest edge +
    centre crop), ``"siglip"`` (SiglipImageProcessorPil; ``image_seq_length`` is set for PaliGemma) or
    ``"vit"`` (ViTImageProcessorPil).
    """
    square = {"height": image_size, "width": image_size}
    if kind == "blip":
        return BlipImageProcessorPil(size=square)
    if kind == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square)
    if kind == "siglip":
        processor = SiglipImageProcessorPil(size=square)
        if image_seq_length is not None:
            processor.image_seq_length = image_seq_length
        return processor
    if kind == "vit":
        return ViTImageProcessorPil(size=square)
    raise ValueError(f"image processor kind must be 'blip', 'clip', 'siglip' or 'vit', got {kind!r}")


#: Builds a tokenizer from the texts; ``image_token_attribute`` as in :func:`build_tiny_tokenizer`.
TokenizerFactory = Callable[..., PreTrainedTokenizerFast]


def _blip(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer()
    return BlipProcessor(build_tiny_image_processor("blip", image_size), tok)


def _blip2(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer(image_token_attribute=False)  # Blip2Processor adds <image> itself
    return Blip2Processor(build_tiny_image_processor("blip", image_size), tok, num_query_tokens=num_query_tokens)


def _llava(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer()
    return LlavaProcessor(build_tiny_image_processor("clip", image_size), tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _paligemma(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer()
    num_patches = (image_size // patch_size) ** 2
    return PaliGemmaProcessor(build_tiny_image_processor("siglip", image_size, num_patches), tok)


def _git(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer()
    return GitProcessor(build_tiny_image_processor("clip", image_size), tok)


def _image_text(tokenizer: TokenizerFactory, image_size: int, patch_size: int, num_query_tokens: int) -> Any:
    tok = tokenizer()
    return ImageTextProcessor(build_tiny_image_processor("vit", image_size), tok)


#: Tiny-processor builder per ``InputLayout.tiny_processor`` (the processor class it builds).
_TINY_PROCESSORS: dict[str, Callable[[TokenizerFactory, int, int, int], Any]] = {
    "BlipProcessor": _blip,
    "Blip2Processor": _blip2,
    "LlavaProcessor": _llava,
    "PaliGemmaProcessor": _paligemma,
    "GitProcessor": _git,
    "ImageTextProcessor": _image_text,
}


def build_tiny_processor(
    family: str,
    texts: Iterable[str],
    *,
    vocab_size: int = 99,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
) -> Any:
    """A working processor for a tiny model of ``family`` (a family of :data:`vlpeft.tasks.layouts.LAYOUTS`:
    the names of ``vlpeft.models.tiny.FAMILIES`` plus the composites), built without any download: the processor
    class named by the layout's ``tiny_processor``, with a tokenizer of its ``tokenizer_style``.

    The image-token counts match the tiny configs: BLIP-2 ``num_query_tokens`` (4); LLaVA and PaliGemma
    ``(image_size / patch_size) ** 2`` (16; LLaVA's CLS is dropped by the "default" feature strategy).
    """
    layout = layout_for(family)

    def tokenizer(image_token_attribute: bool = True) -> PreTrainedTokenizerFast:
        return build_tiny_tokenizer(texts, vocab_size, layout.tokenizer_style,
                                    image_token_attribute=image_token_attribute)

    return _TINY_PROCESSORS[layout.tiny_processor](tokenizer, image_size, patch_size, num_query_tokens)
