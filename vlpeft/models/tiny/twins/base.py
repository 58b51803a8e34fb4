"""Tiny twins of real chat VLMs: the real model and processor classes with tiny configs, built offline.

A *twin* stands in for a hub checkpoint (``Qwen/Qwen2.5-VL-3B-Instruct``, ``HuggingFaceTB/SmolVLM-256M-Instruct``,
...) in tests and smoke runs. It is built from the family's real config class with a tiny size, and comes with the
family's real processor class assembled from

- a word-level fast tokenizer (:func:`build_chat_tokenizer`) whose special tokens sit at the ids the tiny config
  names, and a chat template written for the project in the family's style (image parts rendered as the family's
  image placeholder, assistant text inside ``{% generation %}`` markers for assistant-only losses);
- the family's PIL image processor with tiny output sizes (no torchvision).

Inputs are made the way users make them: conversations rendered by ``processor.apply_chat_template`` and
processed together with the images (:meth:`Twin.batch`), so dynamic-resolution families get their real
``image_grid_thw`` / tiles / ``pixel_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "CHAT_WORDS",
    "ImageOnlyProcessorMixin",
    "Sample",
    "Twin",
    "TwinSpec",
    "build_chat_tokenizer",
    "chat_template",
    "suppress_image_token",
    "tiny_image",
]

#: Ordinary words of every twin vocabulary (prompts, answers and role names used by tests, examples and demos).
CHAT_WORDS: tuple[str, ...] = (
    "user", "assistant", "system", "what", "is", "in", "the", "image", "picture", "photo", "describe", "this",
    "a", "an", "of", "color", "colour", "shape", "how", "many", "are", "there", "yes", "no", "red", "green", "blue",
    "yellow", "white", "black", "circle", "square", "triangle", "one", "two", "three", "four", "left", "right",
    "top", "bottom", "and", "on", "with", "does", "entail", "contradict", "neutral", "entailment", "contradiction",
    "question", "answer", "caption", "short", "?", ".", ",", ":", "!",
)


def build_chat_tokenizer(
    special_tokens: Sequence[str],
    *,
    pad_token: str,
    eos_token: str,
    bos_token: str | None = None,
    unk_token: str = "<unk>",
    words: Iterable[str] = CHAT_WORDS,
    chat_template: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    vocab_size: int | None = None,
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level fast tokenizer: ``special_tokens`` at ids 0, 1, ..., then ``unk_token``, then
    ``words``.

    Special tokens are matched before splitting (so ``<|image_pad|>`` in a rendered template is one token);
    whitespace and punctuation separate words; unknown words map to ``unk_token``. No special token is added
    around a text (chat templates write them).

    Args:
        special_tokens: the family's special tokens, in id order (give them the ids the tiny config names).
        pad_token / eos_token / bos_token / unk_token: which of them play these roles (``unk_token`` is added
            after ``special_tokens`` when not among them).
        words: the ordinary vocabulary.
        chat_template: the Jinja chat template.
        extra_special_tokens: named special tokens that processors read as tokenizer attributes
            (``{"image_token": "<image>"}``).
        vocab_size: pad the vocabulary with filler words up to this size (the tiny config's ``vocab_size``).

    Raises:
        ValueError: a role token is not among the special tokens, or the vocabulary exceeds ``vocab_size``.
    """
    specials = list(dict.fromkeys(special_tokens))
    if unk_token not in specials:
        specials.append(unk_token)
    for role, token in (("pad", pad_token), ("eos", eos_token), ("bos", bos_token)):
        if token is not None and token not in specials:
            raise ValueError(f"{role}_token {token!r} is not one of the special tokens {specials}")
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    if vocab_size is not None:
        if len(vocab) > vocab_size:
            raise ValueError(f"the twin vocabulary has {len(vocab)} tokens, more than vocab_size={vocab_size}")
        filler = 0
        while len(vocab) < vocab_size:
            vocab.setdefault(f"w{filler}", len(vocab))
            filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        unk_token=unk_token,
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=4096,
    )
    # The unnamed special tokens (turn markers, ...) are registered here: transformers 5 drops an
    # ``additional_special_tokens`` list passed alongside ``extra_special_tokens``, which left them unmatched.
    named = {pad_token, eos_token, bos_token, unk_token, *(extra_special_tokens or {}).values()}
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in specials if t not in named]})
    tokenizer.chat_template = chat_template
    for token, expected in vocab.items():
        if token in specials and tokenizer.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.convert_tokens_to_ids(token)}, "
                               f"expected {expected}")
    return tokenizer


def chat_template(
    *,
    turn_start: str,
    turn_end: str,
    image: str,
    role_names: dict[str, str] | None = None,
    bos: str = "",
    assistant_role: str = "assistant",
) -> str:
    """A chat template in the common ``<start>role\\n content <end>\\n`` style.

    Args:
        turn_start / turn_end: text before the role name and after each turn (``<|im_start|>`` / ``<|im_end|>``).
        image: what one ``{"type": "image"}`` part renders to (the family's placeholder, e.g.
            ``<|vision_start|><|image_pad|><|vision_end|>``).
        role_names: renaming of roles (Gemma's ``model`` for ``assistant``).
        bos: text at the start of the conversation.
        assistant_role: the role whose text is wrapped in ``{% generation %}`` markers.

    String contents and content lists of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts are both
    accepted; ``add_generation_prompt`` opens an assistant turn.
    """
    names = role_names or {}
    rename = "".join(
        f"{{% if role == '{src}' %}}{{% set role = '{dst}' %}}{{% endif %}}" for src, dst in names.items()
    )
    generation_role = names.get(assistant_role, assistant_role)
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )
    return (
        f"{bos}"
        "{% for message in messages %}{% set role = message['role'] %}" + rename +
        f"{turn_start}{{{{ role }}}}\n"
        f"{{% if role == '{generation_role}' %}}{{% generation %}}{content}{turn_end}{{% endgeneration %}}"
        # the newline after a turn is an expression: chat templates render with trim_blocks, which drops a literal
        # newline right after a block tag such as ``{% endif %}``
        f"{{% else %}}{content}{turn_end}{{% endif %}}{{{{ '\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{turn_start}{generation_role}\n{{% endif %}}"
    )


class ImageOnlyProcessorMixin:
    """Put first in the bases of a processor class with a video slot: the subclass handles images and text only.

    The video processor is ``None`` (the families' video processor classes need torchvision), and the constructor
    declares only the image processor and the tokenizer (transformers reads a processor's sub-processors from its
    ``__init__`` signature); every other keyword argument goes to the family's processor.
    """

    def __init__(self, image_processor: Any = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 **kwargs: Any) -> None:
        # the next class in the MRO is the family's processor
        super().__init__(  # type: ignore[call-arg]
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs
        )


def suppress_image_token(model: nn.Module) -> None:
    """Keep the random model from generating its image placeholder (an ``adjust_model``): a generated placeholder
    would be one token more than the image features on an uncached re-run."""
    model.generation_config.suppress_tokens = [model.config.image_token_id]


def tiny_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic random RGB image of ``width`` x ``height``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Sample:
    """One single-turn example: images (in order), the user prompt and the assistant answer."""

    images: tuple[Image.Image, ...]
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, Any]]:
        user = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.prompt}]
        turns: list[dict[str, Any]] = [{"role": "user", "content": user}]
        if with_answer:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
        return turns


@dataclass(frozen=True)
class TwinSpec:
    """How to build one family's twin.

    Attributes:
        name: twin name (the transformers ``model_type`` where there is one, e.g. ``"qwen2_5_vl"``).
        hub_name: the real checkpoint the twin stands in for.
        build_config: returns the tiny config (token ids as the tokenizer's).
        model_class: the real ``...ForConditionalGeneration`` class.
        build_processor: returns the offline processor (the family's processor class).
        image_sizes: (width, height) of the example images; differing sizes exercise dynamic resolution.
        processor_kwargs: extra keyword arguments for ``processor(...)`` calls.
        adjust_model: in-place change to the freshly initialised model, run under the twin's seed (e.g. opening
            gates that the family initialises closed, so that the random model depends on its images).
    """

    name: str
    hub_name: str
    build_config: Callable[[], Any]
    model_class: type[nn.Module]
    build_processor: Callable[[], Any]
    image_sizes: tuple[tuple[int, int], ...] = ((32, 32), (48, 32))
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    adjust_model: Callable[[nn.Module], None] | None = None


@dataclass
class Twin:
    """A built twin: the model, its processor, and input makers.

    Attributes:
        spec: what it was built from.
        model: the randomly initialised model (train mode).
        processor: the offline processor.
        seed: the seed of the weights and of :meth:`samples`.
    """

    spec: TwinSpec
    model: nn.Module
    processor: Any
    seed: int = 0

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.processor.tokenizer

    def samples(self, images_per_sample: Sequence[int] = (1, 1), seed: int | None = None) -> list[Sample]:
        """Samples with the given numbers of images; image sizes cycle through ``spec.image_sizes``."""
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        words = [w for w in CHAT_WORDS if w.isalpha() and w not in ("user", "assistant", "system")]
        out = []
        counter = 0
        for i, count in enumerate(images_per_sample):
            images = []
            for _ in range(count):
                width, height = self.spec.image_sizes[counter % len(self.spec.image_sizes)]
                images.append(tiny_image(width, height, seed * 1000 + counter))
                counter += 1
            prompt = " ".join(rng.choice(words, size=3 + i)) + " ?"
            answer = " ".join(rng.choice(words, size=2))
            out.append(Sample(tuple(images), prompt, answer))
        return out

    def _process(self, texts: list[str], samples: Sequence[Sample], padding_side: str) -> dict[str, torch.Tensor]:
        images = [list(s.images) for s in samples]
        tokenizer = self.tokenizer
        previous = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        # padding_side is also passed to the call: some processors default it in their text kwargs (InternVL: left),
        # which would override the tokenizer attribute.
        try:
            if any(images):
                encoded = self.processor(text=texts, images=images, padding=True, padding_side=padding_side,
                                         return_tensors="pt", **self.spec.processor_kwargs)
            else:
                encoded = self.processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt")
        finally:
            tokenizer.padding_side = previous
        return dict(encoded)

    def batch(self, samples: Sequence[Sample] | None = None, *, with_labels: bool = True) -> dict[str, torch.Tensor]:
        """Training inputs: each sample rendered by the chat template, processed with its images, right-padded.

        ``labels`` are the ``input_ids`` on the assistant turn (answer and turn end) and -100 elsewhere (prompt,
        image placeholders, padding).
        """
        samples = list(samples) if samples is not None else self.samples()
        render = self.processor.apply_chat_template
        full = [render(s.messages(), tokenize=False) for s in samples]
        encoded = self._process(full, samples, "right")
        if not with_labels:
            return encoded
        prompts = [render(s.messages(with_answer=False), tokenize=False, add_generation_prompt=True)
                   for s in samples]
        prompt_lengths = self._process(prompts, samples, "right")["attention_mask"].sum(dim=1)
        labels = encoded["input_ids"].clone()
        positions = torch.arange(labels.shape[1]).unsqueeze(0)
        labels[positions < prompt_lengths.unsqueeze(1)] = -100
        labels[encoded["attention_mask"] == 0] = -100
        encoded["labels"] = labels
        return encoded

    def generation_batch(self, samples: Sequence[Sample] | None = None) -> dict[str, torch.Tensor]:
        """Prompt-only inputs for ``generate``, left-padded, ending with the opened assistant turn."""
        samples = list(samples) if samples is not None else self.samples()
        prompts = [self.processor.apply_chat_template(s.messages(with_answer=False), tokenize=False,
                                                      add_generation_prompt=True) for s in samples]
        return self._process(prompts, samples, "left")
