"""What the demo compares and how much it trains: the specs both demo settings share.

A :class:`MethodSpec` is one row of the results table (a label, the training API's ``method.type`` and its
options); a :class:`DemoSize` is how much data and training every run gets. The routing kinds are the routing
function's own (:data:`vlpeft.functional.ROUTING_KINDS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlpeft.functional import ROUTING_KINDS
from vlpeft.report.demo_results import TASK_ORDER

__all__ = [
    "DEFAULT_ROUTING",
    "FULL_LEARNING_RATE",
    "PEFT_LEARNING_RATE",
    "ROUTING_KINDS",
    "TASKS",
    "DemoSize",
    "MethodSpec",
    "check_routing_kinds",
    "lora_and_adapter_specs",
]

#: The demo's tasks, in the results table's column order.
TASKS: tuple[str, ...] = TASK_ORDER
#: Routing kinds run by default (``--full`` runs every kind of :data:`ROUTING_KINDS`).
DEFAULT_ROUTING: tuple[str, ...] = ("matmul",)

# One recipe for every parameter-efficient method: lr 5e-3 (picked once from {2e-3, 5e-3} with LoRA alone),
# bottleneck d/8 (p-adapter.md §5.1), LoRA r = 8 on query/value (the p-adapter paper's LoRA row). Full
# fine-tuning uses a 10x lower learning rate, as both papers do. Nothing is tuned per method.
PEFT_LEARNING_RATE = 5e-3
FULL_LEARNING_RATE = 5e-4


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a display label, the training API's ``method.type`` and its options.

    ``learning_rate`` ``None`` means :data:`PEFT_LEARNING_RATE`. The fields enter every run's fingerprint
    (:mod:`vlpeft.demo.runlog`): renaming or adding one makes earlier ``runs.jsonl`` records unusable."""

    label: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None

    def base_learning_rate(self) -> float:
        """The learning rate before the size's ``lr_scale``."""
        return self.learning_rate or PEFT_LEARNING_RATE


@dataclass(frozen=True)
class DemoSize:
    """How much data and training each run gets (``train_*``: training examples; ``test_*``: evaluated ones).

    ``lr_scale`` multiplies every method's learning rate (1 for the real demo; short runs on an untrained smoke
    base need larger steps).
    """

    synth_preset: str
    base_preset: str
    train_vqa: int
    train_ve: int
    train_caption: int
    test_vqa: int
    test_ve: int
    test_caption: int
    steps_vqa: int
    steps_ve: int
    steps_caption: int
    batch_size: int
    lr_scale: float = 1.0

    def steps(self, task: str) -> int:
        """Optimiser steps of a run on ``task`` (captioning starts close to its pretraining task and needs
        fewer; VQA and entailment are new to the base)."""
        return {"vqa": self.steps_vqa, "snli_ve": self.steps_ve, "caption": self.steps_caption}[task]

    def learning_rate(self, method: MethodSpec) -> float:
        """The learning rate a run of ``method`` trains with."""
        return method.base_learning_rate() * self.lr_scale


def check_routing_kinds(routing_kinds: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the kinds that are not in :data:`ROUTING_KINDS`."""
    unknown = sorted(set(routing_kinds) - set(ROUTING_KINDS))
    if unknown:
        raise ValueError(f"unknown routing kinds {unknown}; expected a subset of {ROUTING_KINDS}")


def lora_and_adapter_specs(routing_kinds: Sequence[str]) -> tuple[list[MethodSpec], list[MethodSpec]]:
    """(plain, routed): LoRA (r = 8) and the bottleneck Adapter (d/8), then routed LoRA and routed Adapter once per
    routing kind (all routed LoRA rows first). Both settings compare these."""
    check_routing_kinds(routing_kinds)
    plain = [
        MethodSpec("LoRA", "lora", {"r": 8, "lora_alpha": 16}),
        MethodSpec("Adapter", "adapter", {"reduction_factor": 8}),
    ]
    routed = [MethodSpec(f"routed LoRA ({kind})", "routed_lora", {"r": 8, "lora_alpha": 16, "routing": kind})
              for kind in routing_kinds]
    routed += [MethodSpec(f"routed Adapter ({kind})", "routed_adapter", {"reduction_factor": 8, "routing": kind})
               for kind in routing_kinds]
    return plain, routed
