"""The vision-prefix composite for classification (:mod:`vlpeft.models.modeling_vision_prefix_lm`): an encoder LM
(BERT/RoBERTa) read by a two-layer MLP head, for VQA (soft-score BCE over an answer vocabulary) or entailment
(cross-entropy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig
from vlpeft.models.modeling_vision_prefix_base import VisionPrefixLMPreTrainedModel

__all__ = ["VisionPrefixClassifierHead", "VisionPrefixClassifierOutput", "VisionPrefixLMForClassification"]


@dataclass
class VisionPrefixClassifierOutput(ModelOutput):
    """Output of :class:`VisionPrefixLMForClassification`.

    Attributes:
        loss: scalar loss when ``labels`` are given.
        logits: (batch, num_labels).
        hidden_states / attentions: the text model's, over the full sequence [prefix; text].
        visual_features: (batch, m, d_text), the ``prefix_projector`` output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_features: torch.FloatTensor | None = None


class VisionPrefixClassifierHead(nn.Module):
    """Linear(d, h) -> LayerNorm(h) -> GELU -> Linear(h, num_labels), the released ``--classifier_2layer`` head.

    Input (batch, d), output (batch, num_labels). ``h`` defaults to 2d.
    """

    def __init__(
        self, hidden_size: int, num_labels: int, inner_size: int | None = None, dropout: float = 0.0
    ):
        super().__init__()
        inner_size = inner_size or 2 * hidden_size
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.layer_norm = nn.LayerNorm(inner_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.layer_norm(self.fc1(self.dropout(pooled))))
        return self.fc2(self.dropout(hidden))


class VisionPrefixLMForClassification(VisionPrefixLMPreTrainedModel):
    """Vision encoder + encoder LM (BERT/RoBERTa) + :class:`VisionPrefixClassifierHead`.

    Sequence fed to the text model: [prefix (m tokens); text (seq_len tokens)], the attention mask gets m leading
    ones, and the text is embedded once (word embeddings; the text model adds positions, token types, LN).
    """

    holds_task = "classification"

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        if config.task != "classification":
            raise ValueError(
                f"VisionPrefixLMForClassification needs task='classification', got {config.task!r}"
            )
        super().__init__(config, vision_model=vision_model, text_model=text_model)
        self.num_labels = config.num_labels
        self.classifier = VisionPrefixClassifierHead(
            config.text_hidden_size,
            config.num_labels,
            config.classifier_hidden_size,
            config.classifier_dropout,
        )
        if config.head_pooling == "random_frozen_pooler":
            pooler = getattr(self.text_model, "pooler", None)
            if pooler is None:
                raise ValueError(
                    f"head_pooling='random_frozen_pooler' but {type(self.text_model).__name__} has no pooler"
                )
        self.post_init()
        if config.head_pooling == "random_frozen_pooler":
            self.text_model.pooler.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> VisionPrefixClassifierOutput:
        """Classify (image, text) pairs.

        Args:
            input_ids: (batch, seq_len) text token ids (or ``inputs_embeds`` (batch, seq_len, d_text)).
            attention_mask: (batch, seq_len) 1 for real tokens; defaults to all ones.
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision) precomputed.
            labels: (batch, num_labels) soft scores in [0, 1] for ``multi_label_classification`` (BCE with
                logits, mean over all entries), or (batch,) class ids for ``single_label_classification``.
            token_type_ids: optional (batch, seq_len); the prefix gets type 0.
            **kwargs: passed to the text model (e.g. ``output_attentions``, ``output_hidden_states``).
        """
        visual = self._visual_features(pixel_values, vision_features)
        text_embeds = self._embed_text(input_ids, inputs_embeds)
        batch_size, seq_len = text_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=text_embeds.device)
        prefix_len = visual.shape[1] if self.config.use_visual_prefix else 0
        if prefix_len:
            embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds], dim=1)
            full_mask = torch.cat([attention_mask.new_ones(batch_size, prefix_len), attention_mask], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat(
                    [token_type_ids.new_zeros(batch_size, prefix_len), token_type_ids], 1
                )
        else:
            embeds, full_mask = text_embeds, attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        kwargs["return_dict"] = True
        outputs = self.text_model(inputs_embeds=embeds, attention_mask=full_mask, **kwargs)
        pooled = self._pool(outputs, prefix_len, attention_mask)
        logits = self.classifier(pooled)
        loss = self._loss(logits, labels) if labels is not None else None
        return VisionPrefixClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_features=visual,
        )

    def _pool(self, outputs: Any, prefix_len: int, text_mask: torch.Tensor) -> torch.Tensor:
        """(batch, d_text) head input from the text model's (batch, prefix_len + seq_len, d_text) states."""
        mode = self.config.head_pooling
        hidden = outputs.last_hidden_state
        if mode == "random_frozen_pooler":
            return outputs.pooler_output
        if mode == "first":
            return hidden[:, 0]
        if mode == "first_text":
            return hidden[:, prefix_len]
        text_hidden = hidden[:, prefix_len:]
        weights = text_mask.to(text_hidden.dtype).unsqueeze(-1)
        return (text_hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"multi_label_classification labels must be soft scores of shape {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"single_label_classification labels must be class ids of shape ({logits.shape[0]},), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        return F.cross_entropy(logits, labels)
