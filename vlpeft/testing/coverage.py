"""Which image-text-to-text models vlpeft's methods attach to, with their defaults, and why not where they do not.

Walks transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: builds each model type's default config on
the meta device (no memory, no download), and attaches each method with its default config through
``peft.get_peft_model``. A refusal must be a ``ValueError`` raised at attach time, whose message names what is
missing; anything else is a bug and is reported as such.

``python -m vlpeft.testing.coverage`` prints the markdown table committed in ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlpeft.tuners.adapter import AdapterConfig
from vlpeft.tuners.p_adapter import PAdapterConfig
from vlpeft.tuners.routed_lora import RoutedLoraConfig

__all__ = ["METHODS", "Attempt", "build_on_meta", "coverage", "main", "render_markdown"]

#: The methods with their defaults (routed ones with the element-wise product, which needs visual features).
METHODS: dict[str, Callable[[], peft.PeftConfig]] = {
    "p-adapter release": lambda: PAdapterConfig(variant="release"),
    "p-adapter paper": lambda: PAdapterConfig(variant="paper"),
    "LoRA": lambda: RoutedLoraConfig(),
    "routed LoRA": lambda: RoutedLoraConfig(routing="mul"),
    "Adapter": lambda: AdapterConfig(),
    "routed Adapter": lambda: AdapterConfig(routing="mul"),
}


@dataclass(frozen=True)
class Attempt:
    """One (model type, method) attachment.

    Attributes:
        model_type / method: what was tried.
        status: ``"ok"``, ``"refused"`` (a ValueError at attach time, or transformers' NotImplementedError for a
            model that does not implement what PEFT needs), ``"no build"`` (the default config does not
            build on the meta device here) or ``"error"`` (any other exception: a bug).
        detail: the number of adapted modules, or the message.
    """

    model_type: str
    method: str
    status: str
    detail: str


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    previous = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(previous)


def build_on_meta(model_type: str) -> nn.Module:
    """The model of ``model_type``'s default config, on the meta device."""
    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _adapted_modules(model: nn.Module) -> int:
    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def attempt(model_type: str, method: str, model: nn.Module) -> Attempt:
    """Attach ``method`` with its defaults to ``model`` (which is consumed)."""
    try:
        with torch.device("meta"):  # adapter weights too: nothing is allocated or initialised
            wrapped = peft.get_peft_model(model, METHODS[method]())
    except (ValueError, NotImplementedError) as error:  # NotImplementedError: transformers' own refusal
        return Attempt(model_type, method, "refused", str(error).splitlines()[0])
    except Exception as error:  # noqa: BLE001  (reported as a bug in the table and by the test)
        return Attempt(model_type, method, "error", f"{type(error).__name__}: {str(error).splitlines()[0]}")
    return Attempt(model_type, method, "ok", f"{_adapted_modules(wrapped)} modules")


def coverage(model_types: list[str] | None = None, methods: list[str] | None = None) -> list[Attempt]:
    """Attempts for every model type of the mapping (or ``model_types``) and every method (or ``methods``)."""
    attempts = []
    for model_type in model_types or sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        with _quiet():
            try:
                model = build_on_meta(model_type)
            except Exception as error:  # noqa: BLE001  (default configs of some types do not build here)
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                attempts += [Attempt(model_type, m, "no build", reason) for m in methods or list(METHODS)]
                continue
            for method in methods or list(METHODS):
                attempts.append(attempt(model_type, method, copy.deepcopy(model)))
    return attempts


def render_markdown(attempts: list[Attempt]) -> str:
    """The coverage table (model type x method) and the reason for every refusal."""
    methods = list(dict.fromkeys(a.method for a in attempts))
    types = list(dict.fromkeys(a.model_type for a in attempts))
    cell = {(a.model_type, a.method): a for a in attempts}
    built = [t for t in types if cell[t, methods[0]].status != "no build"]
    lines = ["| model type | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    marks = {"ok": "yes", "refused": "no", "error": "BUG", "no build": "-"}
    for model_type in types:
        row = [marks[cell[model_type, m].status] for m in methods]
        lines.append(f"| {model_type} | " + " | ".join(row) + " |")
    totals = [sum(cell[t, m].status == "ok" for t in built) for m in methods]
    lines.append(f"| **attached, of {len(built)} that build** | " + " | ".join(map(str, totals)) + " |")
    lines += ["", "Refusals (the first line of each error):", ""]
    for a in attempts:
        if a.status in ("refused", "error"):
            lines.append(f"- `{a.model_type}`, {a.method}: {a.detail}")
    lines += ["", "Model types whose default config does not build on the meta device here:", ""]
    for model_type in types:
        if model_type not in built:
            lines.append(f"- `{model_type}`: {cell[model_type, methods[0]].detail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlpeft.testing.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", action="append", help="only these model types (repeatable)")
    args = parser.parse_args(argv)
    print(render_markdown(coverage(args.model_type)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
