"""vlpeft registers with transformers and PEFT in one place (vlpeft.registration, called by ``import vlpeft``):
the registrations exist after the import, registering twice changes nothing, and no other module registers
anything when imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import peft.mapping
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import vlpeft
from vlpeft.registration import AUTO_MODELS, PEFT_METHODS, register_all

MODEL_TYPES = ("vlpeft_vision_prefix_lm", "vlpeft_clip_bart")
PEFT_DICTS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _snapshot() -> dict[str, object]:
    """What vlpeft registered, as plain values (model types, Auto mappings, PEFT registry entries)."""
    return {
        "configs": {t: CONFIG_MAPPING[t] for t in MODEL_TYPES},
        "models": [auto._model_mapping[config] for auto, config, _ in AUTO_MODELS],
        "peft": {name: dict(getattr(peft.mapping, name)) for name in PEFT_DICTS},
    }


def test_import_registers_models_and_methods():
    assert vlpeft.register_all is register_all
    for model_type in MODEL_TYPES:
        assert AutoConfig.for_model(model_type).model_type == model_type
    for auto, config, model in AUTO_MODELS:
        assert auto._model_mapping[config] is model
    for peft_type, config, tuner in PEFT_METHODS:
        assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is config
        assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is tuner
        assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == tuner.prefix


def test_registering_twice_changes_nothing():
    before = _snapshot()
    register_all()
    register_all()
    assert _snapshot() == before


_NO_SIDE_EFFECTS = textwrap.dedent('''
    import importlib, pkgutil, sys, types

    # stand in for the registration module: importing vlpeft then registers nothing
    calls = []
    sys.modules["vlpeft.registration"] = types.SimpleNamespace(register_all=lambda: calls.append(1))

    import peft.mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import vlpeft

    skipped = []
    for info in pkgutil.walk_packages(vlpeft.__path__, "vlpeft.", onerror=skipped.append):
        if info.name == "vlpeft.registration":
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as error:  # optional dependency (triton, ...)
            skipped.append((info.name, str(error)))
    imported = sorted(name for name in sys.modules if name.startswith("vlpeft."))
    assert len(imported) > 50, imported
    assert calls == [1], calls  # vlpeft/__init__.py calls register_all() once
    for model_type in ("vlpeft_vision_prefix_lm", "vlpeft_clip_bart"):
        assert model_type not in CONFIG_MAPPING, f"{model_type} was registered on import"
    ours = {"PADAPTER", "ROUTED_LORA", "BOTTLENECK_ADAPTER"}
    registered = {str(getattr(k, "value", k)) for k in peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING}
    assert not registered & ours, f"{registered & ours} registered with PEFT on import"

    del sys.modules["vlpeft.registration"]
    from vlpeft.registration import register_all
    register_all()
    assert "vlpeft_clip_bart" in CONFIG_MAPPING
    registered = {str(getattr(k, "value", k)) for k in peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING}
    assert ours <= registered
    print("ok", len(imported), "modules; skipped", skipped)
''')


def test_no_module_registers_on_import():
    """Every vlpeft module imported in a fresh interpreter with the registration module replaced: nothing is
    registered, until the real register_all() runs."""
    done = subprocess.run([sys.executable, "-c", _NO_SIDE_EFFECTS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")
