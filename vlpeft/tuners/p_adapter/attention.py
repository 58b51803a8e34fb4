"""p-adapter on attention blocks: :class:`PAdapterAttention` wraps a whole attention block and adds the
p-adapter after the attention output projection, before the residual add / LayerNorm (p-adapter.md §2.3-2.4, §3, §4).

- BERT-style post-LN blocks (BLIP text, Q-Former, BERT/RoBERTa, GIT text): ``block.output`` computes
  dense -> dropout -> LayerNorm(h + input); the adapter edits the dropout's output through a temporary hook.
- Blocks returning the projected attention output (Llama/Gemma/OPT/CLIP/SigLIP/BLIP vision attention): the adapter
  edits the block's first output; the residual is added by the caller.

Graph inputs (post-softmax, pre-dropout attention; projected queries; projected values of all key positions,
cached ones included) come from :mod:`vlpeft.glue.attention`: the ``"padapter"`` attention function for models
that use transformers' AttentionInterface, temporary forward hooks for inline-attention models. The variants'
maths is in :mod:`~vlpeft.tuners.p_adapter.variants`, the KV-cache side state in
:mod:`~vlpeft.tuners.p_adapter.decoding_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlpeft._transformers_compat import cache_from_kwargs
from vlpeft.functional import mu_from_offset, p_from_theta, theta_from_p
from vlpeft.functional.p_laplacian.backend import (
    BackendChoice,
    combine_choices,
    log_choice,
    recording_backends,
    require_backend,
)
from vlpeft.functional.precision import autocast_disabled
from vlpeft.glue.attention import (
    PADAPTER_ATTENTION,
    FusedReleaseRequest,
    MissingAttentionError,
    attended_query_rows,
    capture_attention,
    hook_module_outputs,
)
from vlpeft.glue.attention_blocks import AttentionBlockSpec, describe_attention_block, submodule
from vlpeft.glue.attention_paths import inline_attention_choice
from vlpeft.tuners.p_adapter.config import PAdapterConfig
from vlpeft.tuners.p_adapter.decoding_state import cached_values, paper_past_degrees
from vlpeft.tuners.p_adapter.layer import (
    AdapterScalar,
    AdapterSettings,
    PAdapterLayer,
    _first_param_device,
    _getattr_with_fallback,
    _linear,
    _pattern_value,
    block_dtype,
)
from vlpeft.tuners.p_adapter.variants import (
    _heads_to_tokens,
    _projection_weights,
    _tokens_to_heads,
    paper_branch,
    release_branch,
    release_fold,
    release_output,
)


def _drop_unattended_rows(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the attention rows of queries whose keys are all masked (their softmax is an artefact).

    When every row attends (causal masks without padding, the common case) ``probs`` is returned as is: the
    product would be a second (batch, heads, n_q, n_k) tensor per layer in the forward and in the backward pass.
    """
    rows = attended_query_rows(mask, probs.shape[-2], probs.shape[-1])
    if rows is None or bool(rows.all()):
        return probs
    return probs * rows.to(probs.dtype)


@dataclass
class _GraphInputs:
    query: torch.Tensor  # (batch, n_q, heads * head_dim)
    value: torch.Tensor  # (batch, n_k, heads * head_dim)
    probs: torch.Tensor | None  # (batch, heads, n_q, n_k); None when the fused kernels computed ``aggregated``
    aggregated: torch.Tensor | None = None  # release U (batch, heads, n, d_f) from the fused kernels
    # rows -> probs[..., rows, :], when the attention function can recompute the attention (see AttentionCapture)
    recompute: Callable[[slice], torch.Tensor] | None = None
    kv_heads: int | None = None  # distinct value heads before grouped-query repetition (None: as many as heads)
    block_plan: list[tuple[slice, int]] | None = None  # probs[..., rows, n_keys:] == 0 (from the blocked attention)


def _masked_rows(recompute: Callable[[slice], torch.Tensor], attended: torch.Tensor
                 ) -> Callable[[slice], torch.Tensor]:
    """``recompute`` with the unattended query rows zeroed as :func:`_drop_unattended_rows` does; ``attended``
    (batch or 1, 1 or heads, n_q, 1) boolean."""

    def rows_of(rows: slice) -> torch.Tensor:
        block = recompute(rows)
        return block * attended[..., rows, :].to(block.dtype)

    return rows_of


class PAdapterAttention(nn.Module, PAdapterLayer):
    """An attention block with p-adapters after its output projection.

    Args:
        base_layer: the attention block (see module docstring for supported layouts).
        module_name: its full name in the model (used for pattern-specific settings and error messages).

    Attributes:
        padapter_backend: what computed the block's last adapted forward call (attention path and p-Laplacian
            backend, with the reason), a :class:`~vlpeft.functional.p_laplacian.backend.BackendChoice`; ``None``
            before the first one. Logged on the ``vlpeft.backend`` logger at the first call. See
            :func:`padapter_backends`.
    """

    __getattr__ = _getattr_with_fallback

    def __init__(self, base_layer: nn.Module, module_name: str, spec: AttentionBlockSpec | None = None) -> None:
        super().__init__()
        self._init_padapter_containers(base_layer)
        self.module_name = module_name
        self.spec = describe_attention_block(base_layer, module_name) if spec is None else spec
        weight, _ = _projection_weights(submodule(base_layer, self.spec.out_proj))
        self.hidden_size = int(weight.shape[0])
        self.attention_width = int(weight.shape[1])
        self.num_heads = self._find_num_heads()
        self._padapter_choices: tuple[BackendChoice, ...] = ()  # the backend choices of the last adapted call

    def _find_num_heads(self) -> int:
        attention = submodule(self.base_layer, self.spec.attention)
        for owner in (attention, getattr(attention, "config", None)):
            for name in ("num_heads", "num_attention_heads", "n_head", "num_attention_heads_per_partition"):
                value = getattr(owner, name, None)
                if isinstance(value, int) and value > 0:
                    return value
        raise ValueError(f"{self.module_name}: cannot determine the number of attention heads.")

    # -------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: PAdapterConfig) -> None:
        """Create the adapter ``adapter_name`` on this block according to ``config``."""
        width = config.bottleneck_size or max(1, self.hidden_size // config.reduction_factor)
        graph = "self" if config.variant == "release" and not self.spec.is_cross else "bipartite"
        if config.variant == "release" and config.bottleneck_size is None and width % self.num_heads:
            width += self.num_heads - width % self.num_heads  # d / reduction rounded up to whole heads
        if config.variant == "release" and width % self.num_heads:
            raise ValueError(
                f"{self.module_name}: the release variant splits the bottleneck r={width} into "
                f"{self.num_heads} heads; choose bottleneck_size/reduction_factor so that r is divisible by it."
            )
        p_value = _pattern_value(config.p_init_pattern, self.module_name, config.p_init)
        config.check_p_value(p_value, f"initial p of {self.module_name}")
        raw = config.p_parametrization == "raw"
        settings = AdapterSettings(
            variant=config.variant,
            graph=graph,
            p_value=p_value,
            learnable_p=config.learnable_p,
            p_bounds=None if raw else config.p_bounds,
            mu0=float(config.mu0),
            learnable_mu=bool(config.learnable_mu),
            key_pool_size=config.key_pool_size if self.spec.is_cross else None,
            self_loop=config.self_loop,
            causal_degrees=self.spec.is_causal if config.causal_degrees is None else config.causal_degrees,
            chunk_size=config.chunk_size,
            compile_block=bool(config.compile_block),
            backend=config.backend,
        )
        require_backend(config.backend)
        device = _first_param_device(self.base_layer)
        zero_up = config.init_weights == "zero_up"
        std = config.init_std
        self.padapter_down[adapter_name] = _linear(self.hidden_size, width, std, False, device)
        if config.variant == "release":
            self.padapter_gate[adapter_name] = _linear(self.hidden_size, width, std, False, device)
        self.padapter_up[adapter_name] = _linear(width, self.hidden_size, std, zero_up, device)
        if config.learnable_p:
            start = p_value if raw else theta_from_p(p_value, *config.p_bounds)
            self.padapter_p[adapter_name] = AdapterScalar(start, device)
        if settings.learnable_mu:
            self.padapter_mu[adapter_name] = AdapterScalar(0.0, device)
        self.padapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.padapter_settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def p_value(self, adapter_name: str) -> torch.Tensor | float:
        """Current p of an adapter (a 0-d tensor when learnable)."""
        settings = self.padapter_settings[adapter_name]
        if not settings.learnable_p:
            return settings.p_value
        raw = self.padapter_p[adapter_name]()
        if settings.p_bounds is None:
            return raw
        # The clamp only removes float rounding past the bounds when sigmoid(theta) saturates.
        return p_from_theta(raw, *settings.p_bounds).clamp(*settings.p_bounds)

    def mu_value(self, adapter_name: str) -> torch.Tensor | float:
        """Current mu of an adapter (a 0-d tensor when learnable)."""
        settings = self.padapter_settings[adapter_name]
        if not settings.learnable_mu:
            return 2.0 * settings.mu0
        return mu_from_offset(self.padapter_mu[adapter_name](), settings.mu0)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._active_names()
        if self.disable_adapters or not names:
            return self.base_layer(*args, **kwargs)
        with recording_backends() as choices:
            outputs = self._adapted_forward(names, args, kwargs)
        self._note_backend(choices)
        return outputs

    @property
    def padapter_backend(self) -> BackendChoice | None:
        """What computed the last adapted call (see the class docstring), or None before the first."""
        return combine_choices(self._padapter_choices)

    def _note_backend(self, choices: list[BackendChoice]) -> None:
        """Keep what computed this call (:attr:`padapter_backend`); log it at the module's first adapted call."""
        if not choices:
            return
        if not self._padapter_choices:
            log_choice(self.module_name, combine_choices(choices))
        self._padapter_choices = tuple(choices)

    def _backend_override(self, names: list[str]) -> str:
        """The ``PAdapterConfig.backend`` of the active adapters (they must agree)."""
        requested = {self.padapter_settings[name].backend for name in names}
        if len(requested) > 1:
            raise ValueError(f"{self.module_name}: the active adapters {names} ask for different backends "
                             f"{sorted(requested)}; activate adapters with the same PAdapterConfig.backend together.")
        return requested.pop()

    def _adapted_forward(self, names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = self.spec
        attention = submodule(self.base_layer, spec.attention)
        if spec.capture == "interface":
            implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
            if implementation != PADAPTER_ATTENTION:
                raise MissingAttentionError(
                    f"{self.module_name}: attention implementation is {implementation!r}; p-adapter needs the "
                    f"{PADAPTER_ATTENTION!r} implementation on adapted towers (fused sdpa/flash kernels return no "
                    "attention weights). Do not change the attention implementation of a p-adapter model."
                )
        cache = cache_from_kwargs(kwargs)
        record: dict[str, Any] = {}
        if spec.capture == "inline" and not spec.is_cross:
            record["mask"] = kwargs.get("attention_mask")
        watched: dict[str, nn.Module] = {}
        if spec.capture == "inline":
            if spec.style == "bert":
                watched["attention"] = attention
            for key in ("query", "value", "fused_qkv"):
                name = getattr(spec, key)
                if name is not None:
                    watched[key] = self.base_layer.get_submodule(name)

        override = self._backend_override(names)
        if spec.capture == "inline":
            inline_attention_choice(override)
        with capture_attention(attention) as capture:
            capture.fused = self._fused_request(names)
            capture.backend_override = override
            capture.recompute_wanted = self._wants_recomputed_attention(names)

            def adapt(output: torch.Tensor) -> torch.Tensor:
                inputs = self._graph_inputs(capture, record, cache, output.shape[1])
                return self._apply_adapters(names, output, inputs, cache)

            if spec.style == "bert":
                dropout = self.base_layer.get_submodule(spec.out_dropout)
                with hook_module_outputs(record, watched, {dropout: adapt}):
                    outputs = self.base_layer(*args, **kwargs)
                if "adapted" not in record:
                    raise MissingAttentionError(
                        f"{self.module_name}: the block's output dropout was not called; cannot place the adapter."
                    )
                return outputs
            with hook_module_outputs(record, watched):
                outputs = self.base_layer(*args, **kwargs)
            if not isinstance(outputs, tuple):
                raise TypeError(f"{self.module_name}: expected the attention block to return a tuple, got {type(outputs)}")
            record["returned_probs"] = outputs[1] if len(outputs) > 1 else None
            adapted = adapt(outputs[0])
            return (adapted, *outputs[1:])

    def _graph_inputs(
        self, capture: Any, record: dict[str, Any], cache: Any, n_q: int
    ) -> _GraphInputs:
        spec = self.spec
        if spec.capture == "interface":
            if capture.calls != 1 or (capture.probs is None and capture.aggregated is None):
                raise MissingAttentionError(
                    f"{self.module_name}: expected exactly one call of the {PADAPTER_ATTENTION!r} attention function "
                    f"during the block's forward, saw {capture.calls}; the adapter received no attention weights."
                )
            record["adapted"] = True
            if capture.aggregated is not None:
                return _GraphInputs(_heads_to_tokens(capture.query), _heads_to_tokens(capture.value), None,
                                    capture.aggregated)
            probs = _drop_unattended_rows(capture.probs, capture.mask)
            recompute = capture.recompute_probs
            if recompute is not None and probs is not capture.probs:
                recompute = _masked_rows(recompute, attended_query_rows(capture.mask, *probs.shape[-2:]))
            return _GraphInputs(_heads_to_tokens(capture.query), _heads_to_tokens(capture.value), probs,
                                recompute=recompute, kv_heads=capture.kv_heads, block_plan=capture.block_plan)
        if spec.style == "bert":
            inner_out = record.get("attention")
            probs = inner_out[1] if isinstance(inner_out, tuple) and len(inner_out) > 1 else None
        else:
            probs = record.get("returned_probs")
            dropout = getattr(submodule(self.base_layer, spec.attention), "dropout", None)
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
                raise ValueError(
                    f"{self.module_name}: this inline attention returns post-dropout weights; p-adapter needs the "
                    f"pre-dropout attention. Set its attention dropout to 0 (it is {dropout.p}) or run in eval mode."
                )
        if probs is None:
            raise MissingAttentionError(f"{self.module_name}: the inline attention returned no attention weights.")
        heads = probs.shape[1]
        if spec.fused_qkv is not None:
            qkv = record["fused_qkv"]
            batch, n, width = qkv.shape
            parts = qkv.reshape(batch, n, 3, width // 3)
            query, value = parts[:, :, 0], parts[:, :, 2]
        else:
            query = record["query"]
            value = record.get("value")
            if cache is not None:
                attention = submodule(self.base_layer, spec.attention)
                value = _heads_to_tokens(cached_values(cache, attention, spec.is_cross, self.module_name))
        if value is None or query is None:
            raise MissingAttentionError(f"{self.module_name}: projected queries/values were not captured.")
        if value.shape[1] != probs.shape[-1] or query.shape[1] != probs.shape[-2]:
            raise RuntimeError(
                f"{self.module_name}: captured shapes disagree: queries {tuple(query.shape)}, values "
                f"{tuple(value.shape)}, attention {tuple(probs.shape)} ({heads} heads)."
            )
        record["adapted"] = True
        return _GraphInputs(query, value, _drop_unattended_rows(probs, record.get("mask")))

    def _wants_recomputed_attention(self, names: list[str]) -> bool:
        """Whether a chunked ``release`` self-graph adapter is active: its block can rebuild the attention rows in
        the backward pass instead of keeping the attention (when nothing else keeps it, see
        ``p_laplacian_aggregate(recompute_attention=...)``)."""
        return self.spec.capture == "interface" and any(
            self.padapter_settings[name].variant == "release" and self.padapter_settings[name].graph == "self"
            and self.padapter_settings[name].chunk_size is not None for name in names)

    def _fused_request(self, names: list[str]) -> FusedReleaseRequest | None:
        """Request the fused GPU kernels for a single active ``release`` self-graph adapter of an interface model (the
        attention function's backend choice then decides whether they run for the call)."""
        if self.spec.capture != "interface" or len(names) != 1:
            return None
        name = names[0]
        settings = self.padapter_settings[name]
        if settings.variant != "release" or settings.graph != "self":
            return None
        heads = self.num_heads

        def features(value_states: torch.Tensor) -> torch.Tensor:
            with autocast_disabled(value_states.device.type):
                fold_weight, fold_bias = self._release_fold(name)
                nodes = F.linear(_heads_to_tokens(value_states).float(), fold_weight, fold_bias)
            return _tokens_to_heads(nodes, heads)

        def coefficients() -> tuple[torch.Tensor | float, torch.Tensor | float]:
            return self.p_value(name), self.mu_value(name)

        return FusedReleaseRequest(features, coefficients, self.padapter_down[name].out_features // heads, None,
                                   settings.self_loop, settings.p_bounds)

    def _release_fold(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~vlpeft.tuners.p_adapter.variants.release_fold` of adapter ``name``, in ``dtype``."""
        return release_fold(self.padapter_down[name], submodule(self.base_layer, self.spec.out_proj), dtype)

    # -------------------------------------------------------------------------------------------- maths
    def _apply_adapters(
        self, names: list[str], output: torch.Tensor, inputs: _GraphInputs, cache: Any
    ) -> torch.Tensor:
        out_weight, out_bias = _projection_weights(submodule(self.base_layer, self.spec.out_proj))
        delta = None
        device_type = output.device.type
        dtype = block_dtype(output)
        with autocast_disabled(device_type):
            o = output.to(dtype)
            w_o = out_weight.to(dtype)
            b_o = None if out_bias is None else out_bias.to(dtype)
            query = inputs.query.to(dtype)
            value = inputs.value.to(dtype)
            probs = None if inputs.probs is None else inputs.probs.to(dtype)
            for name in names:
                settings = self.padapter_settings[name]
                if inputs.aggregated is not None:  # the fused kernels computed U (single release adapter)
                    branch = release_output(self.padapter_gate[name], self.padapter_up[name],
                                            self.padapter_dropout[name], o, _heads_to_tokens(inputs.aggregated))
                elif settings.variant == "release":
                    branch = self._release_branch(name, settings, o, query, value, probs, inputs.recompute)
                else:
                    branch = self._paper_branch(name, settings, o, query, value, probs, w_o, b_o, cache,
                                                inputs.kv_heads, inputs.block_plan)
                delta = branch if delta is None else delta + branch
        return output + delta.to(output.dtype)

    def _release_branch(
        self,
        name: str,
        settings: AdapterSettings,
        o: torch.Tensor,
        query: torch.Tensor,
        value: torch.Tensor,
        probs: torch.Tensor,
        recompute: Callable[[slice], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """:func:`~vlpeft.tuners.p_adapter.variants.release_branch` with adapter ``name``'s modules."""
        return release_branch(
            o,
            query,
            value,
            probs,
            settings=settings,
            fold=self._release_fold(name, o.dtype),
            gate=self.padapter_gate[name],
            up=self.padapter_up[name],
            dropout=self.padapter_dropout[name],
            p=self.p_value(name),
            mu=self.mu_value(name),
            module_name=self.module_name,
            recompute=recompute,
        )

    def _paper_branch(
        self,
        name: str,
        settings: AdapterSettings,
        o: torch.Tensor,
        query: torch.Tensor,
        value: torch.Tensor,
        probs: torch.Tensor,
        w_o: torch.Tensor,
        b_o: torch.Tensor | None,
        cache: Any,
        kv_heads: int | None = None,
        block_plan: list[tuple[slice, int]] | None = None,
    ) -> torch.Tensor:
        """:func:`~vlpeft.tuners.p_adapter.variants.paper_branch` with adapter ``name``'s modules and the causal
        degrees carried in ``cache`` (:func:`~vlpeft.tuners.p_adapter.decoding_state.paper_past_degrees`)."""
        past_degrees, store_degrees = paper_past_degrees(
            settings,
            probs.shape[-2],
            probs.shape[-1],
            cache,
            attention=submodule(self.base_layer, self.spec.attention),
            is_cross=self.spec.is_cross,
            owner=self,
            module_name=self.module_name,
        )
        return paper_branch(
            o,
            query,
            value,
            probs,
            w_o,
            b_o,
            settings=settings,
            down=self.padapter_down[name],
            up=self.padapter_up[name],
            dropout=self.padapter_dropout[name],
            p=self.p_value(name),
            mu=self.mu_value(name),
            module_name=self.module_name,
            kv_heads=kv_heads,
            block_plan=block_plan,
            past_degrees=past_degrees,
            store_degrees=store_degrees,
        )

    def __repr__(self) -> str:
        return "padapter." + super().__repr__()


def padapter_backends(model: nn.Module) -> dict[str, BackendChoice | None]:
    """What computed each adapted attention block of ``model`` in its last adapted forward call: module name ->
    :class:`~vlpeft.functional.p_laplacian.backend.BackendChoice` (name "triton", "cpu" or "torch", the attention
    path "fused", "blocked" or "eager", and the reason), or ``None`` for a block that has not run yet."""
    return {module.module_name: module.padapter_backend for module in model.modules()
            if isinstance(module, PAdapterAttention)}
