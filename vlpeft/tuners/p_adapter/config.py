"""Configuration of p-adapter as a PEFT method (p-adapter.md §2, §4, §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from vlpeft.functional import DEFAULT_P_BOUNDS, SELF_LOOP_POLICIES, VARIANTS, check_p_bounds
from vlpeft.functional.p_laplacian.backend import BACKEND_OVERRIDES
from vlpeft.glue.families import POSITIONS
from vlpeft.tuners._peft_registry import VLPeftType

INIT_SCHEMES = ("normal", "zero_up")
P_PARAMETRIZATIONS = ("bounded", "raw")

# Per-task method constants of the released yamls (p-adapter.md §5.1). The released mu0 is the ``release`` variant's
# default only (``release_mu0``); ``paper`` uses PAPER_MU0 for every task (see PAdapterConfig.mu0).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqa": {"p_init": 1.25, "release_mu0": 0.1, "key_pool_size": 16, "reduction_factor": 8},
    "snli_ve": {"p_init": 1.5, "release_mu0": 10.0, "key_pool_size": 24, "reduction_factor": 8},
    "caption": {"p_init": 1.75, "release_mu0": 0.1, "key_pool_size": 24, "reduction_factor": 8},
}
#: mu0 of the ``paper`` variant when none is given, for every task (mu = 2 mu0 = 0.2). Deviation from the SPEC default
#: of p-adapter.md §2.5 (2 mu0 of the task's released constant, i.e. mu = 20 on SNLI-VE); docs/instabilities.md.
PAPER_MU0 = 0.1
#: mu0 of the ``release`` variant when neither ``mu0`` nor ``release_mu0`` is given.
RELEASE_MU0 = 0.1


@dataclass
class PAdapterConfig(PeftConfig):
    """Configuration of a p-adapter (p-Laplacian adapter after attention blocks, plus parallel FFN adapters).

    Placement. Either give explicit ``target_modules`` (attention blocks such as ``...layer.0.attention`` or
    ``...layers.0.self_attn``, and FFN blocks such as ``...layer.0.output`` or ``...layers.0.mlp``), or let the
    model family's preset choose them, optionally narrowed with ``towers`` and ``positions``.

    Attributes:
        target_modules: attention/FFN block names (PEFT matching: a list matches exact names or name suffixes,
            a string is a full-match regex). Mutually exclusive with ``towers``/``positions``.
        towers: tower names or aliases of the model family (``"text"``/``"language"``, ``"vision"``, ``"qformer"``,
            ``"language_model"``, ``"text_decoder"``, ``"text_encoder"``, ``"all"``); default: the family preset.
        positions: subset of ``("self_attn", "cross_attn", "ffn")``; default: the family preset.
        family: model family name (``vlpeft.glue.families``); default: detected from the model class.
        variant: ``"paper"`` (Eqs. 9, 14-16: bipartite [Q; V] graph, head-mean attention, degree normalisation,
            Ū' = GELU(Ū W_down) W_up + Ū replacing the attention output) or ``"release"`` (the released code:
            value-only self-attention graph with self loops, pooled bipartite cross-attention graph, per-head
            bottleneck features, y = o + W_up(GELU(W_gate o) ⊙ U)).
        bottleneck_size: adapter width r; if ``None``, r = hidden size // ``reduction_factor`` (``release`` rounds it up
            to a multiple of the attention heads, which its graph splits r into).
        reduction_factor: used when ``bottleneck_size`` is ``None`` (8 gives r = 96 for d = 768).
        p_init: initial p of every attention adapter.
        p_init_pattern: regex (matched like LoRA's ``rank_pattern`` against the module name) -> initial p.
        learnable_p: whether p is trained (one p per adapted attention block).
        p_bounds: (p_min, p_max) of the bounded reparametrisation p = p_min + (p_max - p_min) sigmoid(theta);
            a fixed or initial p must lie inside.
        p_parametrization: ``"bounded"`` (default) or ``"raw"`` (p itself is the parameter, unconstrained: only for
            faithful reproduction of the released training).
        mu0: mu = mu0 (2 + tanh m), m initialised at 0 (so mu starts at 2 mu0). ``None`` (default): the variant's
            default, ``release``: ``release_mu0`` (else 0.1); ``paper``: :data:`PAPER_MU0` = 0.1 for every task. The
            ``paper`` default deliberately ignores the release's per-task constant (10 on SNLI-VE): in ``paper`` mu
            weighs each node's own feature V̂_q against the attention-weighted aggregate and Ū *replaces* the
            attention output, so mu = 20 makes Ū ≈ V̂_q (the query's projection) and switches attention, image
            cross-attention included, off at init (measured in docs/instabilities.md); in ``release`` a large mu only
            damps a gated side branch.
        release_mu0: the task's released mu0 (``for_task``: 0.1 / 10 / 0.1 for VQA / SNLI-VE / captioning), the
            ``release`` variant's mu0 when ``mu0`` is ``None``; unused by ``paper``.
        learnable_mu: whether m is trained; default ``True`` for ``release`` and ``False`` for ``paper``.
        key_pool_size: number k of average-pooled key tokens of cross-attention graphs (``None``: no pooling).
        self_loop: ``release`` self-attention self-loop policy, ``"release"`` (faithful) or ``"drop"``.
        causal_degrees: ``paper`` degree rule; ``None`` picks causal degrees exactly for blocks of causal decoders.
        dropout: dropout on the adapter bottleneck activations (and on the FFN adapter input).
        init_weights: ``"normal"`` (N(0, ``init_std``) weights, zero biases, as released) or ``"zero_up"``
            (additionally zero W_up, so ``release`` and the FFN adapter start as the identity).
        init_std: standard deviation of the normal initialisation.
        chunk_size: process query rows of the p-Laplacian block in chunks of this size (memory), or ``None``. With
            ``release``, the first adapted layer of a frozen model (whose attention needs no gradient) then also
            recomputes its attention rows chunk by chunk in the backward pass instead of keeping them.
        compile_block: ``release`` only, opt-in: run the p-Laplacian block's per-row-block work through
            ``torch.compile`` (inductor; on CPU a C++ compiler must be installed), fusing its elementwise passes.
            Same formulas (equal to the default path up to float rounding); the first training steps pay the
            compilation (about a minute on a 2-core CPU machine). On CPUs the default path's fused C kernels are
            faster than the compiled block (``docs/performance.md``), which bypasses them; it remains useful on
            GPUs where the fused Triton kernels do not apply.
        backend: which backend computes the p-Laplacian blocks: ``"auto"`` (default: the environment variable
            ``VLPEFT_BACKEND`` if set, else per call the fused Triton kernels where they apply, else the fused C
            kernels on float32 CPU calls, else torch), ``"torch"``, ``"cpu"`` or ``"triton"``. A backend that cannot
            run on this machine is an error; a call it cannot compute falls back, with the reason in
            ``vlpeft.tuners.p_adapter.padapter_backends(model)`` and the ``vlpeft.backend`` log
            (``docs/performance.md``, "Which backend runs").
        modules_to_save: extra modules trained and saved in full (task heads).
        targets_resolved: set by vlpeft once ``target_modules`` holds the regex resolved from the family preset
            (``family``, ``towers``, ``positions`` then record where it came from).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Attention/FFN block names or a full-match regex; default: family preset."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to exclude."})
    towers: list[str] | None = field(default=None, metadata={"help": "Towers of the model family to adapt."})
    positions: list[str] | None = field(
        default=None, metadata={"help": "Subset of self_attn, cross_attn, ffn; default: family preset."}
    )
    family: str | None = field(default=None, metadata={"help": "Model family; default: detected."})
    variant: Literal["paper", "release"] = field(default="paper", metadata={"help": "paper | release"})
    bottleneck_size: int | None = field(default=None, metadata={"help": "Adapter width r."})
    reduction_factor: int = field(default=8, metadata={"help": "r = hidden // reduction_factor."})
    p_init: float = field(default=1.5, metadata={"help": "Initial p."})
    p_init_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Regex -> initial p."})
    learnable_p: bool = field(default=True, metadata={"help": "Train p."})
    p_bounds: tuple[float, float] = field(default=DEFAULT_P_BOUNDS, metadata={"help": "(p_min, p_max)."})
    p_parametrization: Literal["bounded", "raw"] = field(default="bounded", metadata={"help": "bounded | raw"})
    mu0: float | None = field(default=None, metadata={"help": "mu = mu0 (2 + tanh m); None: the variant's default."})
    release_mu0: float | None = field(default=None, metadata={"help": "The task's released mu0 (release default)."})
    learnable_mu: bool | None = field(default=None, metadata={"help": "Train m; default by variant."})
    key_pool_size: int | None = field(default=None, metadata={"help": "Cross-attention key pooling k."})
    self_loop: Literal["release", "drop"] = field(default="release", metadata={"help": "release | drop"})
    causal_degrees: bool | None = field(default=None, metadata={"help": "paper: causal degrees; None = auto."})
    dropout: float = field(default=0.0, metadata={"help": "Adapter dropout."})
    init_weights: Literal["normal", "zero_up"] = field(default="normal", metadata={"help": "normal | zero_up"})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal initialisation."})
    chunk_size: int | None = field(default=None, metadata={"help": "Query chunk size of the p-Laplacian block."})
    compile_block: bool = field(
        default=False, metadata={"help": "release: torch.compile the p-Laplacian block's per-block work (opt-in)."}
    )
    backend: Literal["auto", "torch", "cpu", "triton"] = field(
        default="auto", metadata={"help": "p-Laplacian backend: auto | torch | cpu | triton (overrides VLPEFT_BACKEND)."}
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    targets_resolved: bool = field(
        default=False,
        metadata={"help": "Set by vlpeft when target_modules was resolved from the family preset (towers/positions)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = VLPeftType.PADAPTER
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(
                self.target_modules
            )
        if (
            self.target_modules is not None
            and not self.targets_resolved
            and (self.towers is not None or self.positions is not None)
        ):
            raise ValueError(
                "PAdapterConfig: give either explicit `target_modules` or `towers`/`positions` (family preset), "
                f"not both (target_modules={self.target_modules!r}, towers={self.towers!r}, "
                f"positions={self.positions!r})."
            )
        if isinstance(self.towers, str):
            self.towers = [self.towers]
        if isinstance(self.positions, str):
            self.positions = [self.positions]
        if self.positions is not None:
            unknown = [p for p in self.positions if p not in POSITIONS]
            if unknown or not self.positions:
                raise ValueError(f"positions={self.positions!r}: each must be one of {POSITIONS}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not one of {VARIANTS}.")
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size must be a positive int or None, got {self.bottleneck_size!r}.")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive int, got {self.reduction_factor!r}.")
        self.p_bounds = (float(self.p_bounds[0]), float(self.p_bounds[1]))
        check_p_bounds(*self.p_bounds)
        if self.p_parametrization not in P_PARAMETRIZATIONS:
            raise ValueError(f"p_parametrization={self.p_parametrization!r} is not one of {P_PARAMETRIZATIONS}.")
        self.p_init_pattern = {str(k): float(v) for k, v in (self.p_init_pattern or {}).items()}
        for source, value in [("p_init", self.p_init), *self.p_init_pattern.items()]:
            self.check_p_value(float(value), source)
        if self.release_mu0 is not None and (
            isinstance(self.release_mu0, bool) or not isinstance(self.release_mu0, int | float)
            or not (math.isfinite(self.release_mu0) and self.release_mu0 > 0)
        ):
            raise ValueError(f"release_mu0 must be a finite number > 0 or None, got release_mu0={self.release_mu0}.")
        if self.mu0 is None:
            if self.variant == "release":
                self.mu0 = RELEASE_MU0 if self.release_mu0 is None else float(self.release_mu0)
            else:
                self.mu0 = PAPER_MU0
        if isinstance(self.mu0, bool) or not isinstance(self.mu0, int | float) or not (
            math.isfinite(self.mu0) and self.mu0 > 0
        ):
            raise ValueError(f"mu0 must be a finite number > 0, got mu0={self.mu0}.")
        if self.learnable_mu is None:
            self.learnable_mu = self.variant == "release"
        if self.key_pool_size is not None and (
            isinstance(self.key_pool_size, bool) or not isinstance(self.key_pool_size, int) or self.key_pool_size < 1
        ):
            raise ValueError(f"key_pool_size must be a positive int or None, got {self.key_pool_size!r}.")
        if self.self_loop not in SELF_LOOP_POLICIES:
            raise ValueError(f"self_loop={self.self_loop!r} is not one of {SELF_LOOP_POLICIES}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"init_weights={self.init_weights!r} is not one of {INIT_SCHEMES}.")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std}.")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}.")
        if not isinstance(self.compile_block, bool):
            raise ValueError(f"compile_block must be a bool, got {self.compile_block!r}.")
        if self.backend not in BACKEND_OVERRIDES:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKEND_OVERRIDES}.")
        if self.compile_block and self.variant != "release":
            raise ValueError(
                f"compile_block=True applies to variant='release' only (the compiled block functions), got "
                f"variant={self.variant!r}."
            )

    def check_p_value(self, value: float, source: str) -> None:
        """Raise unless an initial/fixed p is usable under this config's parametrisation."""
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{source}={value}: p must be a finite number > 0.")
        if self.p_parametrization == "raw":
            return
        p_min, p_max = self.p_bounds
        if self.learnable_p and not p_min < value < p_max:
            raise ValueError(
                f"{source}={value}: a learnable p must lie strictly inside p_bounds={self.p_bounds} "
                "(the sigmoid reparametrisation cannot reach the bounds)."
            )
        if not p_min <= value <= p_max:
            raise ValueError(f"{source}={value}: a fixed p must lie in p_bounds={self.p_bounds}.")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> PAdapterConfig:
        """Config with the released per-task constants (``"vqa"``, ``"snli_ve"``, ``"caption"``) and overrides.

        VQA: p = 1.25, mu0 = 0.1, k = 16; SNLI-VE: p = 1.5, mu0 = 10, k = 24; captioning: p = 1.75, mu0 = 0.1,
        k = 24; reduction factor 8 for all. The task's mu0 is ``release_mu0``: the ``release`` variant's mu0; the
        ``paper`` variant keeps mu0 = 0.1 unless ``mu0`` is given.
        """
        if task not in TASK_DEFAULTS:
            raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASK_DEFAULTS)}.")
        return cls(**{**TASK_DEFAULTS[task], **overrides})
