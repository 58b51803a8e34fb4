"""Per-forward visual-feature context: how routed layers find x_R (routing.md §5, §7).

A :class:`VisualFeatureContext` belongs to one tuner (one PEFT-wrapped model); nothing here is global. It

- hooks the model's *visual feature module* (``ModelFamily.visual_feature_module``: BLIP's vision tower, LLaVA's
  projector, BLIP-2's ``language_projection``, the composite's ``prefix_projector``) and stores its output, in the
  language model's width, in the current :class:`Frame`;
- hooks the top-level model to see each forward's ``input_ids``, so that several images per sample (LLaVA) can be
  mapped to their samples through the image placeholder tokens;
- serves routed layers: :meth:`VisualFeatureContext.visual_input` pools the features (``pooler``, ``cls``,
  ``mean``, ``none``) and expands them to the text batch (beam search: features whose batch divides the text
  batch are ``repeat_interleave``-d, which is how ``generate`` expands its inputs);
- survives gradient checkpointing: the checkpoint function of every checkpointed layer is wrapped so that the
  frame active at the original forward is re-activated during recomputation, whichever thread runs it.

Frames live on a thread-local stack (several concurrent forwards, e.g. ``nn.DataParallel`` replicas, do not see
each other's features). :meth:`VisualFeatureContext.scope` pushes a fresh frame for one top-level call (the tuners
open it around ``PeftModel.forward`` / ``generate``); outside any scope the features of the latest forward are
kept in a per-thread *ambient* frame, so that calling the wrapped transformers model directly also works.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlpeft.glue.description import VISUAL_FEATURE_OUTPUTS
from vlpeft.glue.visual_frames import Frame, frame_binding_checkpoint
from vlpeft.glue.visual_rows import (
    Captured,
    MissingVisualFeaturesError,
    cross_attention_rows,
    cut_frozen_graph,
    expand_to_batch,
    placeholder_rows,
    pool,
)

#: How a visual feature source is pooled to x_R (not :data:`vlpeft.functional.POOLINGS`, the routing
#: function's pooling of the visual bottleneck x_v).
VISUAL_FEATURE_POOLINGS: tuple[str, ...] = ("pooler", "cls", "mean", "none")
FEATURE_OUTPUTS: tuple[str, ...] = VISUAL_FEATURE_OUTPUTS
#: Sources read from the language model's inputs (a forward pre-hook) rather than from a module's output.
INPUT_SOURCES: tuple[str, ...] = ("placeholder_embeds", "cross_attention_states")

__all__ = [
    "FEATURE_OUTPUTS",
    "VISUAL_FEATURE_POOLINGS",
    "MissingVisualFeaturesError",
    "VisualFeatureContext",
    "VisualSource",
    "find_visual_contexts",
    "provide_visual_features",
]


@dataclass(frozen=True)
class VisualSource:
    """Where x_R comes from.

    Attributes:
        module: dotted name (in the wrapped transformers model) of the module whose forward output holds x_R.
        output: ``"tensor"`` (the output is the (images, m, d) or (images, d) tensor), ``"last_hidden_state"``
            (a ModelOutput / tuple whose first element is the sequence; a ``pooler_output`` field is kept too),
            ``"placeholder_embeds"`` (``module`` is the language model: x_R of a sample is the rows of its
            ``inputs_embeds`` at the image placeholder tokens, in order, so variable numbers and sizes of images per
            sample need no bookkeeping) or ``"cross_attention_states"`` (``module`` is the language model: its
            ``cross_attention_states`` argument, (batch, m, d)).
        pooler_module: optional module whose output is the pooled (images, d) vector (``pooling="pooler"``).
    """

    module: str
    output: str = "tensor"
    pooler_module: str | None = None

    def __post_init__(self) -> None:
        if self.output not in FEATURE_OUTPUTS:
            raise ValueError(f"visual feature output {self.output!r} is not one of {FEATURE_OUTPUTS}")


class VisualFeatureContext:
    """Per-model store of the visual features of the forward in progress (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._sources: dict[str, VisualSource] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._checkpoint_modules: list[nn.Module] = []
        self._image_token_id: int | None = None
        self._poolings: dict[str, set[str]] = {}
        self._model: weakref.ref[nn.Module] | None = None
        self._hooked_copies: set[int] = set()

    # ----------------------------------------------------------------------------------------- copying
    def __deepcopy__(self, memo: dict[int, Any]) -> VisualFeatureContext:
        """A copied model gets a fresh context: frames are per forward and never copied.

        The copy keeps the registered sources; hooks are re-registered by whoever copies the model (the
        hook closures of the copy refer to the copy's context through ``memo``).
        """
        new = VisualFeatureContext()
        memo[id(self)] = new
        new._sources = dict(self._sources)
        new._image_token_id = self._image_token_id
        new._poolings = {k: set(v) for k, v in self._poolings.items()}
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": dict(self._sources), "image_token_id": self._image_token_id,
                "poolings": {k: set(v) for k, v in self._poolings.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self._sources = state["sources"]
        self._image_token_id = state["image_token_id"]
        self._poolings = state.get("poolings", {})

    # ---------------------------------------------------------------------------------------- frames
    def _stack(self) -> list[Frame]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _ambient(self) -> Frame:
        frame = getattr(self._local, "ambient", None)
        if frame is None:
            frame = self._local.ambient = Frame()
        return frame

    def current_frame(self) -> Frame:
        stack = self._stack()
        return stack[-1] if stack else self._ambient()

    @contextlib.contextmanager
    def activate(self, frame: Frame) -> Iterator[Frame]:
        """Make ``frame`` the current frame of this thread for the duration of the block."""
        stack = self._stack()
        stack.append(frame)
        try:
            yield frame
        finally:
            popped = stack.pop()
            if popped is not frame:
                raise RuntimeError("visual-feature frames were not closed in order (nested scopes interleaved)")

    @contextlib.contextmanager
    def scope(self) -> Iterator[Frame]:
        """One top-level call (forward or generate): features captured inside are dropped at exit."""
        self.bind_checkpointing()
        self._hook_wrapped_copies()
        with self.activate(self.current_frame().child()) as frame:
            yield frame

    @contextlib.contextmanager
    def provide(self, features: Tensor, *, pooled: Tensor | None = None, source: str | None = None) -> Iterator[None]:
        """Use explicit visual features (instead of the ones the model computes) inside the block.

        Args:
            features: (batch, m, d) or (batch, d) visual features in the language model's width, one row per sample.
            pooled: optional (batch, d) pooled vectors for ``pooling="pooler"``.
            source: the source module name; defaults to the only registered source.
        """
        key = self._single_source(source)
        if features.dim() == 2:
            features = features.unsqueeze(1)
        if features.dim() != 3:
            raise ValueError(f"explicit visual features must be (batch, m, d) or (batch, d), got {tuple(features.shape)}")
        if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != features.shape[0]):
            raise ValueError(
                f"explicit pooled features must be (batch, d) with batch {features.shape[0]}, got {tuple(pooled.shape)}"
            )
        frame = self.current_frame().child()
        frame.features[key] = Captured(sequence=features, pooled=pooled, explicit=True)
        self._features_changed(frame, key)
        self.bind_checkpointing()
        with self.activate(frame):
            yield

    def _single_source(self, source: str | None) -> str:
        if source is not None:
            if source not in self._sources:
                raise ValueError(f"unknown visual source {source!r}; registered: {sorted(self._sources)}")
            return source
        if len(self._sources) != 1:
            raise ValueError(
                f"pass source= to choose among the registered visual sources {sorted(self._sources)}"
            )
        return next(iter(self._sources))

    # ------------------------------------------------------------------------------------- attaching
    @property
    def sources(self) -> dict[str, VisualSource]:
        return dict(self._sources)

    def attach(self, model: nn.Module, source: VisualSource, *, image_token_id: int | None = None) -> None:
        """Hook ``model`` (the wrapped transformers model) so that it fills this context.

        Idempotent per source; a second source with the same module but other settings raises.
        """
        existing = self._sources.get(source.module)
        if existing is not None:
            if existing != source:
                raise ValueError(
                    f"visual source {source.module!r} is already registered as {existing}; got {source}"
                )
            return
        try:
            module = model.get_submodule(source.module)
        except AttributeError as error:
            raise ValueError(
                f"visual feature module {source.module!r} does not exist in {type(model).__name__}; set "
                "`visual_feature_module` in the config to the module whose output is x_R"
            ) from error
        self._model = weakref.ref(model)
        if not self._handles:
            self._handles.append(model.register_forward_pre_hook(self._record_input_ids, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._forget_input_ids))
            self._image_token_id = image_token_id
            self._checkpoint_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if source.output in INPUT_SOURCES:
            hook = functools.partial(self._capture_language_input, source)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(functools.partial(self._capture_sequence, source)))
        if source.pooler_module is not None:
            try:
                pooler = model.get_submodule(source.pooler_module)
            except AttributeError as error:
                raise ValueError(f"pooler module {source.pooler_module!r} does not exist in {type(model).__name__}") from error
            self._handles.append(pooler.register_forward_hook(functools.partial(self._capture_pooler, source)))
        self._sources[source.module] = source

    def detach(self) -> None:
        """Remove every hook (used by ``unload()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sources = {}
        self._hooked_copies = set()
        for module in self._checkpoint_modules:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(func, "_vlpeft_context", None) is self:
                module._gradient_checkpointing_func = func._vlpeft_inner
        self._checkpoint_modules = []

    def _hook_wrapped_copies(self) -> None:
        """Hook the copies that PEFT's ``modules_to_save`` runs in place of a visual feature module.

        ``get_peft_model(..., modules_to_save=[<the visual feature module>])`` wraps the module after the tuner
        attached its hooks, and the wrapper runs a deep copy whose copied hooks feed a copied context; the copies
        get hooks into this context here (at the start of every top-level call).
        """
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for source in self._sources.values():
            if source.output in INPUT_SOURCES:
                continue
            copies = getattr(model.get_submodule(source.module), "modules_to_save", None)
            if not isinstance(copies, nn.ModuleDict):
                continue
            for module in copies.values():
                if id(module) not in self._hooked_copies:
                    hook = functools.partial(self._capture_sequence, source)
                    self._handles.append(module.register_forward_hook(hook))
                    self._hooked_copies.add(id(module))

    # ------------------------------------------------------------------------------------------ hooks
    def _record_input_ids(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._hook_wrapped_copies()
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        frame = self.current_frame()
        frame.input_ids = input_ids if isinstance(input_ids, Tensor) else None
        frame.call += 1

    def _forget_input_ids(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.current_frame().input_ids = None

    def _capture_sequence(self, source: VisualSource, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        frame = self.current_frame()
        captured = frame.features.get(source.module)
        if captured is not None and captured.explicit:
            return
        pooled = None
        if source.output == "tensor":
            sequence = output[0] if isinstance(output, tuple) else output  # (features, extras) tuples too
        else:
            sequence = output[0] if isinstance(output, tuple | list) else output.last_hidden_state
            pooled = getattr(output, "pooler_output", None)
        if not isinstance(sequence, Tensor):
            raise TypeError(
                f"visual feature module {source.module!r} returned {type(sequence).__name__}, expected a tensor "
                f"(visual_feature_output={source.output!r})"
            )
        if sequence.dim() == 2:
            sequence = sequence.unsqueeze(1)
        if sequence.dim() != 3:
            raise ValueError(
                f"visual features from {source.module!r} must be (images, m, d) or (images, d), got "
                f"{tuple(sequence.shape)}"
            )
        pooled = cut_frozen_graph(pooled) if isinstance(pooled, Tensor) else None
        new = Captured(sequence=cut_frozen_graph(sequence), pooled=pooled, call=frame.call)
        new.images_per_sample = self._images_per_sample(frame.input_ids, sequence, source.module)
        same_call = captured is not None and captured.call == frame.call
        if same_call and captured.pooled is not None and new.pooled is None:
            new.pooled = captured.pooled
        frame.features[source.module] = new
        self._features_changed(frame, source.module)
        self.bind_checkpointing()

    def _capture_language_input(
        self, source: VisualSource, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Read x_R from the language model's inputs. Calls without visual inputs (cached decoding steps, text-only
        forwards) keep the features of the frame's earlier call."""
        frame = self.current_frame()
        captured = frame.features.get(source.module)
        if captured is not None and captured.explicit:
            return
        if source.output == "cross_attention_states":
            new = cross_attention_rows(kwargs, source.module, frame.call)
            if new is None:
                return
        else:
            embeds = kwargs.get("inputs_embeds")
            new = placeholder_rows(embeds, frame.input_ids, self._image_token_id, source.module, frame.call)
            if new is None:
                return
        new.sequence = cut_frozen_graph(new.sequence)
        frame.features[source.module] = new
        self._features_changed(frame, source.module)
        self.bind_checkpointing()

    def _capture_pooler(self, source: VisualSource, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        frame = self.current_frame()
        captured = frame.features.get(source.module)
        if captured is not None and captured.explicit:
            return
        if captured is None or captured.call != frame.call:
            captured = frame.features[source.module] = Captured(call=frame.call)
        pooled = output if isinstance(output, Tensor) else output[0]
        captured.pooled = cut_frozen_graph(pooled.reshape(pooled.shape[0], -1) if pooled.dim() != 2 else pooled)
        self._features_changed(frame, source.module)

    def request(self, source: str, pooling: str) -> None:
        """Declare that a routed layer reads ``source`` with ``pooling``: it is then pooled as soon as the features
        are captured, outside any checkpointed layer, so that recomputation sees the same operations."""
        self._poolings.setdefault(source, set()).add(pooling)

    def _features_changed(self, frame: Frame, source: str) -> None:
        """Drop derived features of ``source`` and pool the new ones for every requested pooling (errors, such as
        a sample without images, surface when a routed layer asks)."""
        frame.cache.clear()
        for key in [k for k in frame.pooled if k[0] == source]:
            del frame.pooled[key]
        captured = frame.features[source]
        for pooling in self._poolings.get(source, ()):
            if pooling == "pooler" or captured.sequence is None:
                continue
            try:
                frame.pooled[(source, pooling)] = pool(captured, pooling, source)
            except (ValueError, MissingVisualFeaturesError):
                continue

    def _images_per_sample(self, input_ids: Tensor | None, sequence: Tensor, module: str) -> list[int] | None:
        """Map images to samples through the image placeholder tokens of this forward's ``input_ids``.

        Returns None when images are one per sample in order (or no placeholder tokens are used).
        """
        if input_ids is None or self._image_token_id is None or input_ids.dim() != 2:
            return None
        counts = (input_ids == self._image_token_id).sum(dim=1)
        total = int(counts.sum())
        if total == 0:
            return None
        images, tokens_per_image = sequence.shape[0], sequence.shape[1]
        if total != images * tokens_per_image or bool((counts % tokens_per_image).any()):
            raise ValueError(
                f"cannot map {images} images of {tokens_per_image} tokens from {module!r} to the samples: the "
                f"batch has {counts.tolist()} image placeholder tokens (id {self._image_token_id}) per sample"
            )
        per_sample = (counts // tokens_per_image).tolist()
        if all(n == 1 for n in per_sample):
            return None
        return per_sample

    # ---------------------------------------------------------------------------- gradient checkpointing
    def bind_checkpointing(self) -> None:
        """Wrap the checkpoint function of every checkpointed layer so recomputation sees this forward's frame.

        Idempotent; re-wraps functions installed after the last call (``gradient_checkpointing_enable`` after
        ``get_peft_model``) and functions bound to another context (a copied model).
        """
        for module in self._checkpoint_modules:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is None or getattr(func, "_vlpeft_context", None) is self:
                continue
            inner = getattr(func, "_vlpeft_inner", func)
            module._gradient_checkpointing_func = frame_binding_checkpoint(self, inner)

    # ------------------------------------------------------------------------------------ consumption
    def visual_input(
        self, source: str, pooling: str, text_batch: int, *, requester: str, width: int
    ) -> tuple[Tensor, Tensor | None]:
        """Visual features for one routed layer call.

        Args:
            source: the source module name.
            pooling: one of :data:`VISUAL_FEATURE_POOLINGS`.
            text_batch: leading dimension of the layer input (batch, or batch x beams).
            requester: the routed module's name (for error messages).
            width: the routed module's input width d.

        Returns:
            ``(x_R, mask)``: x_R is (text_batch, k, d) (k = 1 for pooled features); ``mask`` is (text_batch, k)
            bool, marking real tokens when samples have different numbers of images, else None.
        """
        if pooling not in VISUAL_FEATURE_POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {VISUAL_FEATURE_POOLINGS}")
        frame = self.current_frame()
        captured = frame.features.get(source)
        if captured is None or (captured.sequence is None and captured.pooled is None):
            raise MissingVisualFeaturesError(
                f"routed module {requester!r} found no visual features from {source!r} for this forward. Call the "
                "model with images (pixel_values), or pass features with vlpeft.glue.visual_features."
                "provide_visual_features(model, features)."
            )
        key = (source, pooling, text_batch)
        cached = frame.cache.get(key)
        if cached is None:
            features, mask = frame.pooled.get((source, pooling)) or pool(captured, pooling, source)
            if features.shape[-1] != width:
                raise ValueError(
                    f"routed module {requester!r} has input width {width}, but the visual features from {source!r} "
                    f"have width {features.shape[-1]}; x_R must be in the language model's width"
                )
            cached = expand_to_batch(features, mask, text_batch, requester)
            frame.cache[key] = cached
        return cached


def find_visual_contexts(model: nn.Module) -> list[VisualFeatureContext]:
    """The visual-feature contexts used by the routed layers inside ``model`` (a PeftModel or tuner)."""
    contexts: list[VisualFeatureContext] = []
    for module in model.modules():
        context = module.__dict__.get("visual_context")
        if isinstance(context, VisualFeatureContext) and all(context is not c for c in contexts):
            contexts.append(context)
    return contexts


@contextlib.contextmanager
def provide_visual_features(
    model: nn.Module, features: Tensor, *, pooled: Tensor | None = None, source: str | None = None
) -> Iterator[None]:
    """Route with explicit features: ``with provide_visual_features(peft_model, x_r): peft_model(**inputs)``.

    ``features`` is (batch, m, d) or (batch, d) in the language model's width; it takes precedence over the
    features the model computes from its images inside the block.
    """
    contexts = find_visual_contexts(model)
    if not contexts:
        raise ValueError(
            f"{type(model).__name__} has no vlpeft routing context; wrap it with a routed RoutedLoraConfig/AdapterConfig first"
        )
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context.provide(features, pooled=pooled, source=source))
        yield
