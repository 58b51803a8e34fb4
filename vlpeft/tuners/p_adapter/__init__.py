"""p-adapter as a PEFT method (registered with PEFT by :func:`vlpeft.registration.register_all`)."""

from vlpeft.functional.p_laplacian.backend import BackendChoice
from vlpeft.tuners.p_adapter.attention import PAdapterAttention, padapter_backends
from vlpeft.tuners.p_adapter.config import TASK_DEFAULTS, PAdapterConfig
from vlpeft.tuners.p_adapter.ffn import PAdapterFFN
from vlpeft.tuners.p_adapter.layer import (
    MERGE_ERROR_MESSAGE,
    AdapterScalar,
    PAdapterLayer,
    PAdapterMergeError,
)
from vlpeft.tuners.p_adapter.model import PRESETS, PAdapterModel, resolve_targets

__all__ = [
    "PRESETS",
    "MERGE_ERROR_MESSAGE",
    "TASK_DEFAULTS",
    "AdapterScalar",
    "BackendChoice",
    "PAdapterAttention",
    "PAdapterConfig",
    "PAdapterFFN",
    "PAdapterLayer",
    "PAdapterMergeError",
    "PAdapterModel",
    "padapter_backends",
    "resolve_targets",
]
