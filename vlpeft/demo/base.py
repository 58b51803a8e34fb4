"""The demo's pretrained base: a small BLIP captioner trained from scratch on procedurally drawn scenes.

``vlpeft pretrain`` (or :func:`ensure_base`) builds a ``BlipForConditionalGeneration`` with transformers' own
classes and a tiny-but-real configuration (:class:`BaseSpec`), a word-level tokenizer built offline from the
generator's vocabulary (:func:`vlpeft.tasks.processors.build_tiny_processor`), and trains all of it with the
Hugging Face ``Trainer`` on image-caption pairs of :class:`~vlpeft.data.procedural.SceneCaptionDataset`
(the "a picture of" prompt of BLIP, loss on the caption, laid out by the task collator of
:mod:`vlpeft.tasks.collators`). It then scores greedy captions on a separate
procedural evaluation set with CIDEr-D, and saves model, processor and a ``vlpeft_base.json`` report
(spec, CIDEr, training time) with ``save_pretrained`` into the user cache::

    ${XDG_CACHE_HOME:-~/.cache}/vlpeft/demo-base/<spec digest>/

The folder is reused when complete and rebuilt when missing; any change of :class:`BaseSpec` gives a new digest.
The saved folder loads with ``BlipForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``,
so the training API uses it like a hub checkpoint (``model.name: <folder>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, Trainer, TrainingArguments

from vlpeft.data.language import vocabulary
from vlpeft.data.procedural import SceneCaptionDataset
from vlpeft.data.scenes import heldout_combinations
from vlpeft.metrics.captioning import UnofficialCaptionMetricsWarning, caption_scores
from vlpeft.tasks.collators import CaptionGenerativeCollator, SequenceEncoder
from vlpeft.tasks.inference import predict_captions
from vlpeft.tasks.processors import build_tiny_processor

REPORT_FILE = "vlpeft_base.json"
FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$VLPEFT_CACHE``, else ``$XDG_CACHE_HOME/vlpeft``, else ``~/.cache/vlpeft``."""
    explicit = os.environ.get("VLPEFT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vlpeft"


@dataclass(frozen=True)
class BaseSpec:
    """Architecture, corpus and schedule of the base model (every field enters the cache digest).

    Architecture: a ViT of ``vision_layers`` layers on ``image_size`` px images with ``patch_size`` px patches and
    a BERT-style text decoder of ``text_layers`` layers with cross-attention to the image, width ``hidden_size``,
    ``num_heads`` heads, FFN ``4 * hidden_size``. Corpus: ``pretrain_images`` scenes x 5 captions drawn with
    ``data_seed`` (held-out pairs of a benchmark with ``heldout_pairs`` / ``data_seed`` excluded). Schedule:
    ``steps`` AdamW steps of ``batch_size`` pairs, peak ``learning_rate``, linear decay after ``warmup_ratio``.
    """

    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 128
    vision_layers: int = 3
    text_layers: int = 3
    num_heads: int = 4
    vocab_size: int = 128
    max_length: int = 48
    pretrain_images: int = 4000
    eval_images: int = 200
    data_seed: int = 0
    heldout_pairs: int = 4
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        for name in ("steps", "batch_size", "pretrain_images", "eval_images", "vision_layers", "text_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def digest(self) -> str:
        """The cache key: every field, and the tokenizer's corpus (the generator's vocabulary), so that a base built
        before a vocabulary change (e.g. "at", added with the inventory-style captions) is not reused."""
        payload = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self),
                              "tokenizer_corpus": tokenizer_corpus()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: A few-second base for tests (no real skill) and the regular one for the demo.
BASE_PRESETS: dict[str, BaseSpec] = {
    "smoke": BaseSpec(hidden_size=32, vision_layers=1, text_layers=1, pretrain_images=40, eval_images=8, steps=4,
                      batch_size=8, image_size=32, patch_size=8),
    "default": BaseSpec(),
}

CAPTION_PROMPT = "a picture of"


def base_dir_for(spec: BaseSpec, root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else cache_root() / "demo-base" / spec.digest()


def load_base_report(path: str | os.PathLike) -> dict[str, Any] | None:
    """The report of a complete base folder (``None`` when absent or incomplete)."""
    report = Path(path) / REPORT_FILE
    if not report.is_file() or not (Path(path) / "config.json").is_file():
        return None
    return json.loads(report.read_text(encoding="utf-8"))


def tokenizer_corpus() -> list[str]:
    """Texts the word-level tokenizer is built from: every generator word, punctuation, the task label words."""
    return [" ".join(vocabulary()), ". , ? : ;", "Correct Ambiguous Incorrect"]


def build_processor(spec: BaseSpec) -> Any:
    """``BlipProcessor`` (PIL image processor at ``spec.image_size`` + word-level tokenizer), built offline."""
    processor = build_tiny_processor("blip_caption", tokenizer_corpus(), vocab_size=spec.vocab_size,
                                     image_size=spec.image_size, patch_size=spec.patch_size)
    size = len(processor.tokenizer)
    if size >= spec.vocab_size:
        raise ValueError(f"the tokenizer needs {size} ids; raise BaseSpec.vocab_size above {size}")
    return processor


def build_model(spec: BaseSpec) -> Any:
    """A randomly initialised ``BlipForConditionalGeneration`` of ``spec`` (seeded by ``spec.seed``)."""
    text = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": 4 * spec.hidden_size,
        "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.num_heads,
        "max_position_embeddings": max(64, spec.max_length + 8), "encoder_hidden_size": spec.hidden_size,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 2,
    }
    vision = {
        "hidden_size": spec.hidden_size, "intermediate_size": 4 * spec.hidden_size,
        "num_hidden_layers": spec.vision_layers, "num_attention_heads": spec.num_heads,
        "image_size": spec.image_size, "patch_size": spec.patch_size,
    }
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=spec.hidden_size,
                        image_text_hidden_size=spec.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = BlipForConditionalGeneration(config)
    for module in model.modules():
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.pad_token_id, generation.bos_token_id, generation.eos_token_id = 0, 1, 2
            generation.max_length = None
            generation.max_new_tokens = spec.max_length
    return model


def _heldout(spec: BaseSpec) -> list[tuple[str, str]]:
    return heldout_combinations(spec.heldout_pairs, spec.data_seed)


def caption_cider(model: Any, processor: Any, spec: BaseSpec, dataset: Any, *, batch_size: int = 32,
                  progress: bool = False) -> dict[str, float]:
    """Greedy captions of ``dataset`` (image-level items with ``image``, ``image_id`` and ``references``) scored
    with CIDEr-D / BLEU-4 (pycocoevalcap; official PTB tokenisation when Java is available)."""
    encoder = SequenceEncoder(processor, "blip_caption", spec.max_length, model.config)
    records = predict_captions(model, dataset, encoder=encoder, prompt=CAPTION_PROMPT, batch_size=batch_size,
                               num_beams=1, max_new_tokens=spec.max_length)
    predictions = {r["image_id"]: r["caption"] for r in records}
    references = {item_id: refs for item_id, refs in _references(dataset).items() if item_id in predictions}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnofficialCaptionMetricsWarning)
        scores = caption_scores(predictions, references, metrics=("Bleu", "CIDEr"))
    example = records[0]["caption"] if records else ""
    return {"CIDEr": float(scores.scores["CIDEr"]), "Bleu_4": float(scores.scores["Bleu_4"]),
            "example": example, "num_images": len(records)}


def _references(dataset: Any) -> dict[Any, list[str]]:
    if hasattr(dataset, "references"):
        return dataset.references()
    return {dataset[i]["image_id"]: dataset[i]["references"] for i in range(len(dataset))}


class ProceduralEvalImages:
    """Image-level evaluation items (``image``, ``image_id``, ``references``) of procedural scenes."""

    def __init__(self, spec: BaseSpec) -> None:
        # a seed offset keeps these scenes apart from the pretraining scenes
        self.source = SceneCaptionDataset(spec.eval_images, seed=spec.data_seed + 104729, heldout=_heldout(spec),
                                          image_size=spec.image_size)

    def __len__(self) -> int:
        return self.source.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.source[index * self.source.captions_per_image]
        _, captions = self.source.scene_and_captions(index)
        return {"image": item["image"], "image_id": index, "references": captions}

    def references(self) -> dict[int, list[str]]:
        return {i: self.source.scene_and_captions(i)[1] for i in range(len(self))}


def pretrain_base(spec: BaseSpec, out_dir: str | os.PathLike, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the base of ``spec`` and save it to ``out_dir`` (written to a temporary folder, then moved).

    Returns the report dict (also written to ``out_dir/vlpeft_base.json``).
    """
    out_dir = Path(out_dir)
    processor = build_processor(spec)
    model = build_model(spec)
    corpus = SceneCaptionDataset(spec.pretrain_images, seed=spec.data_seed, heldout=_heldout(spec),
                                 image_size=spec.image_size)
    # the task collator's layout ([bos] prompt caption [sep], loss on the caption); BLIP computes its own
    # shifted language-modelling loss from ``labels``
    collate = CaptionGenerativeCollator(processor, "blip_caption", max_length=spec.max_length, prompt=CAPTION_PROMPT,
                                        model_config=model.config)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining the demo base: BLIP {spec.vision_layers}+{spec.text_layers} layers, width "
        f"{spec.hidden_size}, {n_params / 1e6:.2f}M parameters, {spec.steps} steps of {spec.batch_size} "
        f"image-caption pairs ({spec.pretrain_images} scenes)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlpeft-pretrain-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate, warmup_steps=max(1, int(spec.warmup_ratio * spec.steps)),
            lr_scheduler_type="linear", weight_decay=spec.weight_decay, max_grad_norm=1.0,
            logging_steps=max(1, spec.steps // 20), save_strategy="no", report_to=[], seed=spec.seed,
            data_seed=spec.seed, disable_tqdm=not progress, dataloader_num_workers=0, use_cpu=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=corpus, data_collator=collate)
        result = trainer.train()
    train_seconds = time.perf_counter() - started
    model.eval()
    eval_started = time.perf_counter()
    scores = caption_cider(model, processor, spec, ProceduralEvalImages(spec))
    report = {
        "format_version": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "digest": spec.digest(),
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - eval_started, 1),
        "final_train_loss": round(float(result.training_loss), 4),
        "caption_scores": scores,
        "torch_threads": torch.get_num_threads(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"base ready in {train_seconds:.0f} s: caption CIDEr-D {scores['CIDEr']:.3f} on {scores['num_images']} "
        f"held-out scenes (e.g. {scores['example']!r}); saved to {out_dir}")
    return report


def ensure_base(spec: BaseSpec | None = None, root: str | os.PathLike | None = None, *, progress: bool = True,
                log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The folder of the base of ``spec`` (built if missing) and its report."""
    spec = spec or BaseSpec()
    path = base_dir_for(spec, root)
    report = load_base_report(path)
    if report is not None and report.get("digest") == spec.digest():
        log(f"using the cached demo base in {path} (caption CIDEr-D {report['caption_scores']['CIDEr']:.3f})")
        return path, report
    return path, pretrain_base(spec, path, progress=progress, log=log)


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vlpeft pretrain`` (the demo base) on a ``vlpeft`` sub-parser set."""
    parser = subparsers.add_parser(
        "pretrain", help="pretrain the demo's small BLIP base on procedural scenes (cached)",
        description="Train the demo's BLIP captioner from scratch on procedurally drawn scenes and cache it "
                    "under the user cache folder (reused when present).",
    )
    parser.add_argument("--preset", choices=sorted(BASE_PRESETS), default="default")
    parser.add_argument("--out", help="folder to save the base to (default: the user cache)")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached base exists")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_pretrain)
    return parser


def run_pretrain(args: argparse.Namespace) -> int:
    spec = BASE_PRESETS[args.preset]
    if args.steps is not None:
        spec = dataclasses.replace(spec, steps=args.steps)
    path = base_dir_for(spec, args.out)
    if args.force:
        report = pretrain_base(spec, path, progress=not args.no_progress)
    else:
        path, report = ensure_base(spec, args.out, progress=not args.no_progress)
    print(json.dumps({"path": str(path), **{k: report[k] for k in ("parameters", "train_seconds", "caption_scores")}},
                     indent=1))
    return 0
