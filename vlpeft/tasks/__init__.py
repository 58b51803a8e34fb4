"""Task data: datasets in the standard formats (VQAv2, SNLI-VE, COCO captions), chat conversation data
(LLaVA JSON, messages + images in JSON / JSON Lines / Parquet / save_to_disk) with a chat-template collator, lazy
images, bad-input policy, offline tiny processors, and collators producing model inputs per family (as each family's
:class:`~vlpeft.tasks.layouts.InputLayout` states its input conventions)."""

from vlpeft.tasks.bad_input import BAD_INPUT_REASONS, BadInputError, BadInputPolicy
from vlpeft.tasks.captions import CaptionDataset, CaptionImage
from vlpeft.tasks.chat_collator import ChatCollator, PromptBatch
from vlpeft.tasks.chat_data import detect_chat_format, load_chat_dataset, read_chat_records
from vlpeft.tasks.chat_records import ChatRecord, normalise_chat_record, single_turn_record
from vlpeft.tasks.collators import (
    GENERATIVE_FAMILIES,
    SEQUENCE_INFO_KEYS,
    CaptionGenerativeCollator,
    EntailmentClassificationCollator,
    EntailmentGenerativeCollator,
    SequenceEncoder,
    VQAClassificationCollator,
    VQAGenerativeCollator,
    split_model_inputs,
)
from vlpeft.tasks.images import ImageFolderIndex, load_image, numeric_image_id
from vlpeft.tasks.layouts import LAYOUTS, InputLayout, layout_for
from vlpeft.tasks.losses import weighted_sequence_loss
from vlpeft.tasks.processors import ImageTextProcessor, build_tiny_processor, build_tiny_tokenizer
from vlpeft.tasks.snli_ve import SNLI_VE_LABELS, SNLIVEDataset, SNLIVERecord
from vlpeft.tasks.vqa import AnswerVocab, VQADataset, VQARecord, basic_answer_normalizer, vqa_soft_scores

__all__ = [
    "BAD_INPUT_REASONS",
    "GENERATIVE_FAMILIES",
    "LAYOUTS",
    "SEQUENCE_INFO_KEYS",
    "SNLI_VE_LABELS",
    "AnswerVocab",
    "BadInputError",
    "BadInputPolicy",
    "CaptionDataset",
    "CaptionGenerativeCollator",
    "CaptionImage",
    "ChatCollator",
    "ChatRecord",
    "EntailmentClassificationCollator",
    "EntailmentGenerativeCollator",
    "ImageFolderIndex",
    "ImageTextProcessor",
    "InputLayout",
    "PromptBatch",
    "SNLIVEDataset",
    "SNLIVERecord",
    "SequenceEncoder",
    "VQAClassificationCollator",
    "VQADataset",
    "VQAGenerativeCollator",
    "VQARecord",
    "basic_answer_normalizer",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "detect_chat_format",
    "layout_for",
    "load_chat_dataset",
    "load_image",
    "normalise_chat_record",
    "numeric_image_id",
    "read_chat_records",
    "single_turn_record",
    "split_model_inputs",
    "vqa_soft_scores",
    "weighted_sequence_loss",
]
