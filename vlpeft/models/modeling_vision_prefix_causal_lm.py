"""The vision-prefix composite as a decoder (:mod:`vlpeft.models.modeling_vision_prefix_lm`): a decoder LM (GPT-2
family) that captions or answers conditioned on the visual prefix, with ``generate()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from vlpeft._transformers_compat import CACHE_ARGUMENT, cache_argument_of, cache_of_output
from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig
from vlpeft.models.modeling_vision_prefix_base import VisionPrefixLMPreTrainedModel

__all__ = ["VisionPrefixCausalLMOutput", "VisionPrefixLMForCausalLM"]


@dataclass
class VisionPrefixCausalLMOutput(ModelOutput):
    """Output of :class:`VisionPrefixLMForCausalLM`.

    Attributes:
        loss: scalar mean next-token loss over the labelled text tokens.
        logits: (batch, p + seq_len, vocab) where p is the number of prefix tokens prepended **in this call**
            (m on a first forward with the prefix on, otherwise 0); ``logits[:, p - 1 + i]`` predicts text token i.
        cache: the text model's cache (covers the prefix positions); ``past_key_values`` before transformers 5.25.
        hidden_states / attentions: the text model's.
        visual_features: (batch, m, d_text), the ``prefix_projector`` output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    # The cache field has the name transformers' generation reads (``cache`` from 5.25, ``past_key_values`` before).
    if CACHE_ARGUMENT == "cache":
        cache: Any = None
    else:
        past_key_values: Any = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_features: torch.FloatTensor | None = None


class VisionPrefixLMForCausalLM(VisionPrefixLMPreTrainedModel, GenerationMixin):
    """Vision encoder + decoder LM (GPT-2 family); captions/answers with ``generate()``.

    Training sequence: [prefix (m tokens); text]; ``labels`` (batch, seq_len) align with the text and use -100
    for ignored positions (padding, prompt). The standard shift trains every labelled text token, including the
    first one, which is predicted from the last prefix position (unless ``skip_first_token_loss``, quirk Q10).
    """

    holds_task = "causal_lm"

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        if config.task != "causal_lm":
            raise ValueError(f"VisionPrefixLMForCausalLM needs task='causal_lm', got {config.task!r}")
        super().__init__(config, vision_model=vision_model, text_model=text_model)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.text_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        prefix_in_sequence: bool = False,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> VisionPrefixCausalLMOutput:
        """Next-token prediction conditioned on the image.

        Args:
            input_ids: (batch, seq_len) text ids (or ``inputs_embeds`` (batch, seq_len, d_text)).
            attention_mask: (batch, seq_len) over the text (the prefix is added here), or, with
                ``prefix_in_sequence``, over the whole sequence including the prefix positions.
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision) precomputed.
            labels: (batch, seq_len) target ids aligned with the text, -100 to ignore.
            cache / use_cache: the text model's cache. The prefix is prepended only when the cache is
                empty (first forward). ``past_key_values`` is the same (its name before transformers 5.25).
            prefix_in_sequence: used by :meth:`generate`: ``inputs_embeds`` already reserves the first m
                positions for the prefix (they are overwritten with the projected features) and
                ``attention_mask`` covers them.
            **kwargs: passed to the text model.
        """
        visual = self._visual_features(pixel_values, vision_features)
        text_embeds = self._embed_text(input_ids, inputs_embeds)
        batch_size, seq_len = text_embeds.shape[:2]
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        cache_len = cache.get_seq_length() if cache is not None else 0
        use_prefix = self.config.use_visual_prefix
        num_visual = visual.shape[1]
        added = 0  # prefix positions prepended in this call
        if prefix_in_sequence:
            if use_prefix and cache_len == 0:
                if seq_len < num_visual:
                    raise ValueError(
                        f"prefix_in_sequence: inputs_embeds has {seq_len} positions, fewer than the {num_visual} "
                        "reserved for the prefix"
                    )
                embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds[:, num_visual:]], dim=1)
            else:
                embeds = text_embeds
            full_mask = attention_mask
        else:
            embeds = text_embeds
            full_mask = attention_mask
            if use_prefix:
                if cache_len == 0:
                    embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds], dim=1)
                    added = num_visual
                if attention_mask is not None:
                    full_mask = torch.cat(
                        [attention_mask.new_ones(batch_size, num_visual), attention_mask], dim=1
                    )
        new_len = embeds.shape[1]
        if full_mask is None:
            full_mask = torch.ones(batch_size, cache_len + new_len, dtype=torch.long, device=embeds.device)
        if full_mask.shape[1] != cache_len + new_len:
            raise ValueError(
                f"attention_mask covers {full_mask.shape[1]} positions but the cache holds {cache_len} and "
                f"{new_len} are new"
            )
        kwargs.pop("position_ids", None)  # positions are derived from the full mask (handles left padding)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:]
        kwargs["return_dict"] = True
        outputs = self.text_model(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_argument_of(self.text_model.forward): cache},
            **kwargs,
        )
        logits = outputs.logits
        loss = self._loss(logits, labels, added) if labels is not None else None
        return VisionPrefixCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_ARGUMENT: cache_of_output(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_features=visual,
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, prefix_len: int) -> torch.Tensor:
        batch_size = labels.shape[0]
        if labels.shape[1] + prefix_len != logits.shape[1]:
            raise ValueError(
                f"labels must align with the text: expected (batch, {logits.shape[1] - prefix_len}), got "
                f"{tuple(labels.shape)}"
            )
        if self.config.skip_first_token_loss:
            labels = labels.clone()
            labels[:, 0] = -100
        full_labels = torch.cat([labels.new_full((batch_size, prefix_len), -100), labels], dim=1)
        shift_logits = logits[:, :-1].float()
        shift_labels = full_labels[:, 1:].to(logits.device)
        return F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Generate text for images, optionally continuing a (left-padded) prompt.

        The vision model runs once; its selected features (batch, m, d_vision) travel as ``vision_features``,
        which ``generate`` expands per beam like every other per-example input, and ``prefix_projector`` runs on
        them at every step. Returns only the **new** tokens (batch * num_return_sequences, new_len), or the
        usual generate output object with ``return_dict_in_generate=True``.

        Args:
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision).
            input_ids: optional prompt (batch, prompt_len), left-padded. Without a prefix and without a prompt,
                generation starts from ``bos_token_id``.
            attention_mask: (batch, prompt_len) for the prompt.
            **generate_kwargs: ``num_beams``, ``max_new_tokens``, ... as for ``GenerationMixin.generate``.
        """
        if generate_kwargs.get("use_cache") is False:
            raise ValueError(
                "VisionPrefixLMForCausalLM.generate needs use_cache=True (the prefix lives in the cache)"
            )
        for key in ("inputs_embeds", "prefix_in_sequence"):
            if key in generate_kwargs:
                raise ValueError(f"VisionPrefixLMForCausalLM.generate builds {key} itself; do not pass it")
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("generate needs pixel_values (batch, 3, H, W) or vision_features")
            vision_features = self.select_visual_features(pixel_values)
        batch_size = vision_features.shape[0]
        device = vision_features.device
        if input_ids is None:
            if self.config.use_visual_prefix:
                input_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
            else:
                bos = self.generation_config.bos_token_id
                if bos is None:
                    raise ValueError(
                        "generation without a visual prefix and without a prompt needs bos_token_id"
                    )
                input_ids = torch.full((batch_size, 1), int(bos), dtype=torch.long, device=device)
        if input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but there are {batch_size} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.get_input_embeddings()(input_ids)
        if self.config.use_visual_prefix:
            num_visual = vision_features.shape[1]
            placeholder = text_embeds.new_zeros(batch_size, num_visual, text_embeds.shape[-1])
            inputs_embeds = torch.cat([placeholder, text_embeds], dim=1)
            attention_mask = torch.cat(
                [attention_mask.new_ones(batch_size, num_visual), attention_mask], dim=1
            )
        else:
            inputs_embeds = text_embeds
        return super().generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            vision_features=vision_features,
            prefix_in_sequence=True,
            **generate_kwargs,
        )
