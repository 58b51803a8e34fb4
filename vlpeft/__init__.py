"""vlpeft: parameter-efficient fine-tuning of vision-language models on Hugging Face PEFT.

``import vlpeft`` registers vlpeft's methods with PEFT and its model classes with transformers' Auto classes
(:func:`vlpeft.registration.register_all`, the one module that registers anything), after which
``peft.get_peft_model(model, config)`` works with the configs exported here.
"""

from vlpeft import models
from vlpeft.registration import register_all
from vlpeft.tuners.adapter import AdapterConfig, BottleneckAdapterModel
from vlpeft.tuners.p_adapter import PAdapterConfig, PAdapterModel
from vlpeft.tuners.routed_lora import RoutedLoraConfig, RoutedLoraModel

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BottleneckAdapterModel",
    "PAdapterConfig",
    "PAdapterModel",
    "RoutedLoraConfig",
    "RoutedLoraModel",
    "models",
    "register_all",
    "__version__",
]

register_all()
