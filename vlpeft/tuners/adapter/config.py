"""Configuration of the classic bottleneck adapter (Houlsby / Pfeiffer / parallel), optionally routed (routing.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from vlpeft.tuners._peft_registry import VLPeftType
from vlpeft.tuners.routed_lora.routing_support import RoutingOptions

STYLES = ("houlsby", "pfeiffer", "parallel")
NONLINEARITIES = ("relu", "gelu", "gelu_new", "silu", "tanh")
UP_INITS = ("zeros", "normal")
ADAPTER_POSITIONS = ("self_attn", "cross_attn", "ffn")
BLOCK_STYLES = ("auto", "mlp", "bert_output")
DEFAULT_POSITIONS = {"houlsby": ["self_attn", "ffn"], "pfeiffer": ["ffn"], "parallel": ["ffn"]}


@dataclass
class AdapterConfig(RoutingOptions, PeftConfig):
    """Bottleneck adapter z = phi(R(W_d y + b_d, W_d x_R + b_d)) W_u^T + b_u (R omitted when ``routing`` is None).

    Placement (``style``):

    - ``"houlsby"``: after the attention output projection and after the FFN output projection of every layer
      (``y`` = that projection's output; the sublayer then continues with ``y + z``);
    - ``"pfeiffer"``: after the FFN output projection only;
    - ``"parallel"``: beside the FFN block: the adapter of the FFN input is added to the FFN output, before the
      block's residual / LayerNorm.

    Args:
        style: one of ``"houlsby"``, ``"pfeiffer"``, ``"parallel"``.
        positions: override the style's positions (subset of ``"self_attn"``, ``"cross_attn"``, ``"ffn"``;
            ``parallel`` supports ``"ffn"`` only).
        reduction_factor: bottleneck size = hidden width // reduction_factor (default 16 when neither this nor
            ``adapter_size`` is set).
        adapter_size: explicit bottleneck size (set at most one of ``adapter_size`` and ``reduction_factor``).
        nonlinearity: ``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"silu"`` or ``"tanh"``.
        residual: sequential styles return ``y + z``; ``False`` returns ``z`` alone (quirk Q6, the released RoBERTa
            adapter without residual). Must stay True for ``parallel``.
        up_init: ``"zeros"`` (the model is unchanged at step 0) or ``"normal"`` (N(0, init_std) as in the released
            code, which uses HF ``_init_weights``). The down-projection is N(0, init_std); biases are zero.
        init_std: standard deviation of the normal initialisations.
        share_block_adapter: quirk Q8 (released GPT-2): one adapter per transformer layer, shared by all of the
            layer's positions.
        parallel_block_style: how the FFN block of ``parallel`` is called: ``"mlp"`` (``forward(x)``),
            ``"bert_output"`` (``forward(h, input_tensor)``) or ``"auto"`` (model family, else the signature).
        target_modules: explicit targets (list: exact or dotted suffix; str: full regex). ``None`` uses the model
            family preset for ``style`` / ``positions`` / ``towers``.
        exclude_modules: modules to skip.
        modules_to_save: extra modules trained and saved in full.
        routing / pooling / towers / visual_feature_module / visual_feature_output / pooler_module /
        matmul_reshape_quirk: see :class:`~vlpeft.tuners.routed_lora.routing_support.RoutingOptions`.
    """

    style: str = field(default="houlsby", metadata={"help": f"Placement: one of {STYLES}."})
    positions: list[str] | None = field(default=None, metadata={"help": "Positions (None: the style's)."})
    reduction_factor: float | None = field(default=None, metadata={"help": "hidden / bottleneck size (16)."})
    adapter_size: int | None = field(default=None, metadata={"help": "Bottleneck size (instead of reduction)."})
    nonlinearity: str = field(default="gelu", metadata={"help": f"One of {NONLINEARITIES}."})
    residual: bool = field(default=True, metadata={"help": "Sequential adapters return y + z (False: z, Q6)."})
    up_init: str = field(default="zeros", metadata={"help": f"Up-projection init: one of {UP_INITS}."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal initialisations."})
    share_block_adapter: bool = field(default=False, metadata={"help": "Quirk Q8: one adapter per layer."})
    parallel_block_style: str = field(default="auto", metadata={"help": f"One of {BLOCK_STYLES}."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Targets (None: preset)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to exclude."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable, saved modules."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = VLPeftType.BOTTLENECK_ADAPTER
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r} is not one of {STYLES}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity={self.nonlinearity!r} is not one of {NONLINEARITIES}")
        if self.up_init not in UP_INITS:
            raise ValueError(f"up_init={self.up_init!r} is not one of {UP_INITS}")
        if self.parallel_block_style not in BLOCK_STYLES:
            raise ValueError(f"parallel_block_style={self.parallel_block_style!r} is not one of {BLOCK_STYLES}")
        if self.adapter_size is not None and self.reduction_factor is not None:
            raise ValueError(
                f"set either adapter_size ({self.adapter_size}) or reduction_factor ({self.reduction_factor}), not both"
            )
        if self.adapter_size is not None and (not isinstance(self.adapter_size, int) or self.adapter_size <= 0):
            raise ValueError(f"adapter_size must be a positive integer, got {self.adapter_size!r}")
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if self.positions is not None:
            self.positions = list(self.positions)
            unknown = [p for p in self.positions if p not in ADAPTER_POSITIONS]
            if unknown or not self.positions:
                raise ValueError(f"positions must be a non-empty subset of {ADAPTER_POSITIONS}, got {self.positions}")
        if self.style == "parallel":
            if self.positions not in (None, ["ffn"]):
                raise ValueError(f"style='parallel' adapts the FFN block only; got positions={self.positions}")
            if not self.residual:
                raise ValueError("residual=False applies to sequential adapters; a parallel adapter is always additive")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        self._validate_routing()

    @property
    def resolved_positions(self) -> list[str]:
        return list(self.positions) if self.positions is not None else list(DEFAULT_POSITIONS[self.style])

    def bottleneck_size(self, width: int) -> int:
        if self.adapter_size is not None:
            return self.adapter_size
        factor = 16 if self.reduction_factor is None else self.reduction_factor
        return max(1, int(width // factor))
