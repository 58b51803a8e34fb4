"""Input conventions of each training family, stated once: one :class:`InputLayout` entry per family.

The task layer (sequence encoding, tiny processors, inference) and the training layer (model loading, task
binding, validation) read these fields instead of branching on family names; adding a family is one new
entry in :data:`LAYOUTS` (its model structure, for PEFT placement, lives in :mod:`vlpeft.glue`).

Sequence kinds (``InputLayout.sequence``; implemented in :mod:`vlpeft.tasks.sequences`, ``labels`` = ids on the
target tokens and the end token, else -100):

===================  ==========================================================================================
kind                 layout of one (prompt, target) training sequence
===================  ==========================================================================================
``causal``           ``[image]*n [begin] prompt target [end]`` in ``input_ids``; ``n`` > 0 only with image
                     placeholders at the head (BLIP-2's query tokens); BLIP caption decoder, GIT, vlpeft's
                     ViT + GPT-2 prefix composite (no begin token: its visual prefix precedes the text)
``chat``             ``[begin]`` then the conversation template (:data:`DEFAULT_LLAVA_TEMPLATE`) with its one
                     ``<image>`` expanded to the image's placeholder count, then `` target [end]`` (LLaVA)
``prefix_suffix``    ``[image]*n [begin] prompt "\\n"``, then the target tokenized on its own and ``[end]``;
                     ``token_type_ids`` 0 on the prefix, 1 on the target and end token (PaliGemma)
``encoder_decoder``  ``decoder_input_ids`` = ``[start] prompt target``, ``labels`` aligned to predict
                     ``prompt target [end]`` (no shift inside the model), prompt masked (VisionEncoderDecoder)
``question_answer``  ``input_ids`` = tokenizer(prompt) for the question encoder; ``decoder_input_ids`` =
                     ``[begin] target [end]`` (BlipForQuestionAnswering)
``chat_template``    the processor's chat template: the user turn holds the image(s) and the prompt, the
                     assistant turn the target; labels on assistant tokens (:mod:`vlpeft.tasks.chat_tasks`;
                     any image-text-to-text model whose processor has a chat template)
``seq2seq``          ``input_ids`` = tokenizer(prompt) with its special tokens (BART: ``<s> prompt </s>``) for the
                     encoder, which appends the visual tokens; ``decoder_input_ids`` = ``[start]`` + tokenizer(
                     target) with its special tokens (VL-T5's BART targets ``<s> target </s>``), ``labels`` on
                     every token after ``[start]``, next-token aligned as in causal rows (CLIP-BART)
===================  ==========================================================================================

Two images per sample (NLVR2; ``InputLayout.two_images``): ``"chat_turn"`` (both images in one user turn of the
chat template), ``"model"`` (the model takes ``pixel_values`` (batch, 2, 3, H, W) and concatenates the images'
visual tokens itself: CLIP-BART), ``"vision_tower"`` (vlpeft runs both images through the vision tower
``vision_module`` and concatenates each sample's two token sequences before the language side reads them:
BLIP, BLIP-2; :mod:`vlpeft.training.image_pairs`), ``None`` (one image per sample only).

This module imports nothing heavy: model classes and tiny-processor builders are named, not imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_LLAVA_TEMPLATE",
    "LAYOUTS",
    "InputLayout",
    "families_where",
    "layout_for",
]

SequenceKind = Literal[
    "causal", "chat", "prefix_suffix", "encoder_decoder", "question_answer", "chat_template", "seq2seq"
]
TokenizerStyle = Literal["cls_sep", "bos", "none"]
BeginToken = Literal["required", "optional", "decoder_start", "none"]
ImagePlaceholders = Literal["query_tokens", "image_seq_length", "patch_grid"]
TinyProcessor = Literal[
    "BlipProcessor", "Blip2Processor", "LlavaProcessor", "PaliGemmaProcessor", "GitProcessor", "ImageTextProcessor"
]
CompositeTask = Literal["causal_lm", "classification", "conditional_generation"]
TwoImages = Literal["chat_turn", "model", "vision_tower"]

DEFAULT_LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

#: Sequence kinds whose target follows the prompt in ``input_ids`` (so candidates can be scored there).
_TARGET_IN_INPUT_IDS: frozenset[str] = frozenset({"causal", "chat", "prefix_suffix", "chat_template"})
#: Sequence kinds without an inference path from a prompt alone.
_NO_PROMPT_INFERENCE: frozenset[str] = frozenset({"encoder_decoder"})


@dataclass(frozen=True)
class InputLayout:
    """How one training family's inputs are laid out, and which classes build and load it.

    Attributes:
        family: the training family name (``model.family`` / ``model.tiny`` in configs).
        tokenizer_style: special tokens the family's tokenizer adds around a text: ``"cls_sep"`` (``[CLS] text
            [SEP]``, BERT-like; the sequences then begin with [CLS] and end with [SEP], where BLIP's ``generate``
            stops and what GIT's config calls eos), ``"bos"`` (``[BOS] text``: OPT, Llama, Gemma) or ``"none"``
            (GPT-2).
        sequence: the sequence kind of the generative framing (module docstring), ``None`` without one.
        begin_token: ``"required"`` (a begin id must exist), ``"optional"`` (used when the tokenizer/config has
            one), ``"decoder_start"`` (the config's ``decoder_start_token_id``, else the begin id; required) or
            ``"none"`` (no begin token).
        image_placeholders: what sets the number of image placeholder tokens in ``input_ids``:
            ``"query_tokens"`` (``num_query_tokens`` of the config or processor), ``"image_seq_length"`` (the
            processor's), ``"patch_grid"`` (patches of the processed image, minus a dropped CLS); ``None``: the
            image enters through cross-attention or a visual prefix, no placeholders.
        prompt_template: conversation template with ``<image>`` and ``{prompt}`` (``chat`` sequences).
        token_type_ids: the model needs ``token_type_ids`` (0 on the prompt, 1 on the target).
        pad_falls_back_to_eos: without a pad token (GPT-2) padding uses the end id (padded positions are masked).
        generate_returns_prompt: ``generate`` echoes the prompt ids before the new tokens.
        generate_drops_last_prompt_id: ``generate`` drops the last prompt id, so it gets the end id appended
            (BLIP's caption ``generate``).
        prefix_predicts_first_token: the model prepends visual positions whose last one predicts the first text
            token (an empty prompt still trains and scores every target token).
        model_computes_loss: the model computes its own mean loss from ``labels`` (per-sequence weights cannot
            be applied, so VQA trains with ``answer_weighting: most_common``).
        classifier: the model has a classifier head (discriminative framing).
        head_modules: task-head modules trained and saved alongside any PEFT method.
        model_class: ``"module:Class"`` for ``from_pretrained`` and for recognising a local checkpoint's
            ``architectures``; ``None`` where the family is not loaded by class name.
        tiny_processor: the processor class :func:`vlpeft.tasks.processors.build_tiny_processor` assembles
            for tiny models (``ImageTextProcessor``: a ViT image processor and the tokenizer).
        composite_task: for vlpeft's composites assembled from a vision and a text part (``model.vision`` +
            ``model.text``): the head task of ``VisionPrefixLMPreTrainedModel.from_pretrained_parts``
            (``causal_lm``, ``classification``), or ``conditional_generation`` for a composite whose
            ``model_class`` has its own ``from_pretrained_parts`` (CLIP-BART); ``None`` for other families.
        composite_text_models: text-model name prefixes (lower case) that make a composite this family.
        hub_prefixes: hub-name prefixes whose family is known without reading a config.
        glue_family: the :mod:`vlpeft.glue` description's name where it differs from ``family``.
        two_images: how a sample's two images (NLVR2) enter the model (module docstring); ``None``: not at all.
        vision_module: the vision tower's attribute name, for ``two_images="vision_tower"``.
        tiny_image_size: the image edge of the family's tiny model (``vlpeft.models.tiny.build_tiny_model``), which
            its tiny processor resizes to.
    """

    family: str
    tokenizer_style: TokenizerStyle
    sequence: SequenceKind | None = None
    begin_token: BeginToken = "required"
    image_placeholders: ImagePlaceholders | None = None
    prompt_template: str | None = None
    token_type_ids: bool = False
    pad_falls_back_to_eos: bool = False
    generate_returns_prompt: bool = True
    generate_drops_last_prompt_id: bool = False
    prefix_predicts_first_token: bool = False
    model_computes_loss: bool = False
    classifier: bool = False
    head_modules: tuple[str, ...] = ()
    model_class: str | None = None
    tiny_processor: TinyProcessor = "ImageTextProcessor"
    composite_task: CompositeTask | None = None
    composite_text_models: tuple[str, ...] = ()
    hub_prefixes: tuple[str, ...] = ()
    glue_family: str | None = None
    two_images: TwoImages | None = None
    vision_module: str | None = None
    tiny_image_size: int = 32

    def __post_init__(self) -> None:
        if (self.sequence == "chat") != (self.prompt_template is not None):
            raise ValueError(f"{self.family}: a prompt_template goes with (and only with) a 'chat' sequence")
        if (self.two_images == "vision_tower") != (self.vision_module is not None):
            raise ValueError(f"{self.family}: a vision_module goes with (and only with) two_images='vision_tower'")

    @property
    def generative(self) -> bool:
        """Whether the family has a generative (prompt, target) sequence layout."""
        return self.sequence is not None

    @property
    def ranks_candidates(self) -> bool:
        """Whether candidates can be scored as ``prompt + target`` in ``input_ids`` (decoder-only layouts)."""
        return self.sequence in _TARGET_IN_INPUT_IDS

    @property
    def encodes_prompts(self) -> bool:
        """Whether inference can encode a prompt alone (for generation or ranking)."""
        return self.generative and self.sequence not in _NO_PROMPT_INFERENCE

    @property
    def trains_generatively(self) -> bool:
        """Whether the generative training framing is available: it evaluates through the prompt encoder."""
        return self.encodes_prompts


_LAYOUTS: tuple[InputLayout, ...] = (
    InputLayout(
        "blip_caption", tokenizer_style="cls_sep", sequence="causal",
        generate_drops_last_prompt_id=True, two_images="vision_tower", vision_module="vision_model",
        model_class="transformers:BlipForConditionalGeneration", tiny_processor="BlipProcessor",
        hub_prefixes=("Salesforce/blip-image-captioning-",),
    ),
    InputLayout(
        "git", tokenizer_style="cls_sep", sequence="causal",
        model_class="transformers:GitForCausalLM", tiny_processor="GitProcessor",
        hub_prefixes=("microsoft/git-",),
    ),
    InputLayout(
        "blip_vqa", tokenizer_style="cls_sep", sequence="question_answer",
        generate_returns_prompt=False, model_computes_loss=True,
        two_images="vision_tower", vision_module="vision_model",
        model_class="transformers:BlipForQuestionAnswering", tiny_processor="BlipProcessor",
        hub_prefixes=("Salesforce/blip-vqa-",),
    ),
    InputLayout(
        "blip2", tokenizer_style="bos", sequence="causal", begin_token="optional",
        image_placeholders="query_tokens", two_images="vision_tower", vision_module="vision_model",
        model_class="transformers:Blip2ForConditionalGeneration", tiny_processor="Blip2Processor",
        hub_prefixes=("Salesforce/blip2-",),
    ),
    InputLayout(
        "llava", tokenizer_style="bos", sequence="chat", begin_token="optional",
        image_placeholders="patch_grid", prompt_template=DEFAULT_LLAVA_TEMPLATE,
        model_class="transformers:LlavaForConditionalGeneration", tiny_processor="LlavaProcessor",
        hub_prefixes=("llava-hf/llava-1.5-", "llava-hf/bakLlava-"),
    ),
    InputLayout(
        "paligemma", tokenizer_style="bos", sequence="prefix_suffix", begin_token="optional",
        image_placeholders="image_seq_length", token_type_ids=True,
        model_class="transformers:PaliGemmaForConditionalGeneration", tiny_processor="PaliGemmaProcessor",
        hub_prefixes=("google/paligemma",),
    ),
    # Every other image-text-to-text model: loaded with AutoModelForImageTextToText, driven by its processor's chat
    # template (its structure for PEFT placement is derived by vlpeft.glue); tiny twins: vlpeft.models.tiny.twins.
    InputLayout(
        "chat_template", tokenizer_style="none", sequence="chat_template", begin_token="none",
        two_images="chat_turn", model_class="transformers:AutoModelForImageTextToText",
    ),
    InputLayout(
        "vision_encoder_decoder", tokenizer_style="none", sequence="encoder_decoder",
        begin_token="decoder_start", generate_returns_prompt=False,
        model_class="transformers:VisionEncoderDecoderModel",
    ),
    InputLayout(
        "vit_roberta", tokenizer_style="cls_sep", classifier=True, head_modules=("classifier",),
        model_class="vlpeft.models:VisionPrefixLMForClassification", composite_task="classification",
        composite_text_models=("roberta",), glue_family="vit_prefix_encoder",
    ),
    # model_class None: a ViT + BERT composite is assembled from its parts (model.vision + model.text); a local
    # checkpoint with VisionPrefixLMForClassification resolves to vit_roberta, whose conventions it shares.
    InputLayout(
        "vit_bert", tokenizer_style="cls_sep", classifier=True, head_modules=("classifier",),
        composite_task="classification", composite_text_models=("bert",), glue_family="vit_prefix_encoder",
    ),
    InputLayout(
        "vit_gpt2", tokenizer_style="none", sequence="causal", begin_token="none",
        pad_falls_back_to_eos=True, generate_returns_prompt=False, prefix_predicts_first_token=True,
        model_class="vlpeft.models:VisionPrefixLMForCausalLM", composite_task="causal_lm",
        composite_text_models=("gpt2", "gpt-2"), glue_family="vit_prefix_decoder",
    ),
    # The routing paper's CLIP-BART (VL-Adapter's setting): model.vision + model.text (a BART checkpoint) are
    # assembled by ClipBartForConditionalGeneration.from_pretrained_parts; BART's tokenizer adds <s> ... </s>.
    InputLayout(
        "clip_bart", tokenizer_style="cls_sep", sequence="seq2seq", begin_token="decoder_start",
        generate_returns_prompt=False, two_images="model",
        model_class="vlpeft.models:ClipBartForConditionalGeneration", composite_task="conditional_generation",
        composite_text_models=("bart",), tiny_image_size=56,
    ),
)

#: The layout of every training family, by family name (in the order the derived family lists use).
LAYOUTS: dict[str, InputLayout] = {layout.family: layout for layout in _LAYOUTS}


def layout_for(family: str) -> InputLayout:
    """The :class:`InputLayout` of ``family``.

    Raises:
        ValueError: for a family without a layout, naming the allowed families.
    """
    layout = LAYOUTS.get(family)
    if layout is None:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(LAYOUTS)}")
    return layout


def families_where(predicate: Callable[[InputLayout], object]) -> tuple[str, ...]:
    """Names of the families whose layout satisfies ``predicate``, in :data:`LAYOUTS` order."""
    return tuple(name for name, layout in LAYOUTS.items() if predicate(layout))
