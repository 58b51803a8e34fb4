"""Configuration of routed LoRA (routing.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from vlpeft.tuners._peft_registry import VLPeftType
from vlpeft.tuners.routed_lora.routing_support import RoutingOptions

FUSED_SLICES = ("q", "k", "v")
BIAS_OPTIONS = ("none", "all", "routed_lora_only")
ATTENTION_POSITIONS = ("self_attn", "cross_attn")


@dataclass
class RoutedLoraConfig(RoutingOptions, PeftConfig):
    """LoRA whose bottleneck mixes in visual features: h = W0 x + (alpha / r) B R(A drop(x), A drop(x_R)).

    ``routing=None`` is plain LoRA (identical outputs and gradients to PEFT's ``LoraConfig`` with the same
    initialisation, and mergeable). With a routing function the update depends on each sample's visual features
    and cannot be merged.

    Args:
        r: bottleneck rank.
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout probability, applied independently to x and to x_R (quirk Q9).
        target_modules: module names (list: exact or dotted suffix) or a regex (full match). ``None`` uses the
            model family preset: query and value projections of the language towers (``towers``) at
            ``positions``; for fused q/k/v projections (GPT-2 ``c_attn``) the fused module with
            ``fused_qkv_slices``.
        exclude_modules: modules to skip (same matching rules).
        positions: attention positions of the preset (``"self_attn"``, ``"cross_attn"``).
        fused_qkv_modules: which targets are fused q/k/v projections whose output is split in three equal
            slices (list or regex; set by the preset). Other targets are treated as plain linears.
        fused_qkv_slices: slices of a fused projection that get a bottleneck (default q and v, as in the paper).
        fused_qv_bottleneck: quirk Q3, the released GPT-2 coupling: one concatenated bottleneck for the fused
            slices, routed as a whole (``matmul`` and ``matmul_expand`` then mix q and v). Default: independent
            bottlenecks per slice.
        bias: ``"none"``, ``"all"`` or ``"routed_lora_only"`` (train the biases of the adapted layers; quirk Q7,
            the released RoBERTa training of the q/v biases).
        init_lora_weights: ``True``: Kaiming-uniform A and zero B (the update is 0 at step 0); ``False``: default
            ``nn.Linear`` initialisation of both (for tests).
        modules_to_save: extra modules trained and saved in full (e.g. a task head).
        routing / pooling / towers / visual_feature_module / visual_feature_output / pooler_module /
        matmul_reshape_quirk: see :class:`~vlpeft.tuners.routed_lora.routing_support.RoutingOptions`.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha; scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on x and (independently) on x_R."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Targets (None: family preset)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to exclude."})
    positions: list[str] = field(
        default_factory=lambda: list(ATTENTION_POSITIONS), metadata={"help": "Preset attention positions."}
    )
    fused_qkv_modules: list[str] | str | None = field(default=None, metadata={"help": "Fused q/k/v targets."})
    fused_qkv_slices: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": "Adapted slices."})
    fused_qv_bottleneck: bool = field(default=False, metadata={"help": "Quirk Q3: coupled q/v bottleneck."})
    bias: str = field(default="none", metadata={"help": f"Bias training: one of {BIAS_OPTIONS}."})
    init_lora_weights: bool = field(default=True, metadata={"help": "Kaiming A and zero B (False: nn.Linear init)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable, saved modules."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = VLPeftType.ROUTED_LORA
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias={self.bias!r} is not one of {BIAS_OPTIONS}")
        self.positions = list(self.positions)
        unknown = [p for p in self.positions if p not in ATTENTION_POSITIONS]
        if unknown or not self.positions:
            raise ValueError(f"positions must be a non-empty subset of {ATTENTION_POSITIONS}, got {self.positions}")
        self.fused_qkv_slices = list(self.fused_qkv_slices)
        bad = [s for s in self.fused_qkv_slices if s not in FUSED_SLICES]
        if bad or not self.fused_qkv_slices or len(set(self.fused_qkv_slices)) != len(self.fused_qkv_slices):
            raise ValueError(f"fused_qkv_slices must be distinct names from {FUSED_SLICES}, got {self.fused_qkv_slices}")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        self._validate_routing()
