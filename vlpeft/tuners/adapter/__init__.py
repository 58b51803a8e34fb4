"""Bottleneck adapter baseline (Houlsby / Pfeiffer / parallel), optionally with a routing function (routing.md §4)."""

from vlpeft.tuners.adapter.config import AdapterConfig
from vlpeft.tuners.adapter.layer import BottleneckAdapterLayer, ParallelAdapter, SequentialAdapter
from vlpeft.tuners.adapter.model import BottleneckAdapterModel

__all__ = ["AdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModel", "ParallelAdapter", "SequentialAdapter"]
