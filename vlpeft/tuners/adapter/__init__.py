"""Bottleneck adapter baseline (Houlsby / Pfeiffer / parallel), optionally with a routing function (routing.md §4)."""

from vlpeft.tuners._peft_registry import VLPeftType, register_method
from vlpeft.tuners.adapter.config import AdapterConfig
from vlpeft.tuners.adapter.layer import BottleneckAdapterLayer, ParallelAdapter, SequentialAdapter
from vlpeft.tuners.adapter.model import BottleneckAdapterModel

register_method(VLPeftType.BOTTLENECK_ADAPTER, AdapterConfig, BottleneckAdapterModel)

__all__ = ["AdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModel", "ParallelAdapter", "SequentialAdapter"]
