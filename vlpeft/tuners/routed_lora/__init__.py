"""Routed LoRA: LoRA with a routing function in its low-rank bottleneck (routing.md §3)."""

from vlpeft.tuners.routed_lora.config import RoutedLoraConfig
from vlpeft.tuners.routed_lora.layer import Linear as RoutedLoraLinear
from vlpeft.tuners.routed_lora.layer import RoutedLoraLayer
from vlpeft.tuners.routed_lora.model import RoutedLoraModel

__all__ = ["RoutedLoraConfig", "RoutedLoraLayer", "RoutedLoraLinear", "RoutedLoraModel"]
