"""``vlpeft data synth``: a built-in vision-language benchmark of procedurally drawn scenes.

One call writes three tasks in their standard formats (see :mod:`vlpeft.data.writers`), so the same loaders and
metrics serve real and built-in data::

    OUT/
      coco/train2014/COCO_train2014_000000000001.jpg ...   scenes shared by VQA and captioning
      coco/val2014/ ...  coco/test2014/ ...
      coco/dataset_coco.json                               Karpathy captions (splits train / val / test)
      vqa/v2_OpenEnded_mscoco_{train,val,test}2014_questions.json
      vqa/v2_mscoco_{train,val,test}2014_annotations.json
      snli_ve/flickr30k_images/<id>.jpg                    scenes with an optional occluder
      snli_ve/snli_ve_{train,dev,test}.jsonl
      synth_meta.json                                      config, held-out pairs, paths, text-only baselines

Captions are in the *inventory* style ("2 objects: circle of color red, square of color blue"), not in the
procedural style the demo's base is pretrained on ("a red circle and a blue square"), so that captioning needs
adaptation (:mod:`vlpeft.data.language`). SNLI-VE premises keep the procedural style.

The meta file is written last: its presence with the same config means the benchmark is complete
(:func:`ensure_benchmark` reuses it). Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlpeft.data.baselines import text_only_baselines
from vlpeft.data.language import (
    make_captions,
    make_hypotheses,
    make_inventory_captions,
    make_questions,
    vocabulary,
)
from vlpeft.data.scenes import (
    SPLITS,
    Scene,
    all_combinations,
    heldout_combinations,
    render_scene,
    sample_scene,
    scene_rng,
)
from vlpeft.data.writers import (
    coco_file_name,
    human_answers,
    vqa_annotation_file,
    vqa_question_file,
    write_karpathy_captions,
    write_snli_ve_split,
    write_vqa_split,
)

META_FILE = "synth_meta.json"
#: 2: the caption task is written in the inventory style (:func:`~vlpeft.data.language.make_inventory_captions`),
#: no longer in the procedural style the demo base is pretrained on; the vocabulary has "at".
FORMAT_VERSION = 2
#: Style of the COCO / Karpathy caption task (:data:`~vlpeft.data.language.CAPTION_STYLES`).
CAPTION_STYLE = "inventory"
COCO_TAGS: dict[str, str] = {"train": "train2014", "val": "val2014", "test": "test2014"}
VE_SPLITS: dict[str, str] = {"train": "train", "val": "dev", "test": "test"}
_COCO_ID_BASE = {"train": 1, "val": 1_000_001, "test": 2_000_001}
_FLICKR_ID_BASE = {"train": 5_000_000_001, "val": 5_001_000_001, "test": 5_002_000_001}
_MAX_PER_SPLIT = 999_999
# random streams of one image
_SCENE, _RENDER, _TEXT, _ANSWERS = 0, 1, 2, 3


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and knobs of the built-in benchmark.

    ``images`` are COCO-style scenes (each with ``questions_per_image`` VQA questions and
    ``captions_per_image`` captions); ``ve_images`` are entailment scenes (half with an occluder) with
    ``hypotheses_per_image`` hypotheses each. Counts are (train, val, test).
    """

    seed: int = 0
    image_size: int = 64
    images: tuple[int, int, int] = (3000, 300, 600)
    ve_images: tuple[int, int, int] = (2000, 200, 500)
    questions_per_image: int = 3
    captions_per_image: int = 5
    hypotheses_per_image: int = 3
    min_objects: int = 1
    max_objects: int = 4
    heldout_pairs: int = 4
    heldout_test_fraction: float = 0.5
    annotator_noise: float = 0.05
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for name in ("images", "ve_images"):
            counts = getattr(self, name)
            if len(counts) != 3 or any(not isinstance(c, int) or c < 1 or c > _MAX_PER_SPLIT for c in counts):
                raise ValueError(f"{name} must be three image counts (train, val, test) in [1, {_MAX_PER_SPLIT}], "
                                 f"got {counts!r}")
        for name in ("questions_per_image", "captions_per_image", "hypotheses_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.heldout_test_fraction <= 1.0:
            raise ValueError(f"heldout_test_fraction must be in [0, 1], got {self.heldout_test_fraction}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        heldout_combinations(self.heldout_pairs, self.seed)  # validates the count
        if self.heldout_pairs and self.heldout_pairs * 2 > len(all_combinations()):
            raise ValueError("heldout_pairs leaves too few combinations for training")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SynthConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(images=(48, 12, 24), ve_images=(200, 8, 40)),
    "small": SynthConfig(images=(600, 100, 200), ve_images=(400, 60, 150)),
    "default": SynthConfig(),
}


@dataclass
class BenchmarkFiles:
    """Paths of a generated benchmark (all absolute)."""

    root: Path
    coco_images: Path
    karpathy_json: Path
    vqa_dir: Path
    ve_images: Path
    ve_jsonl: dict[str, Path] = field(default_factory=dict)

    def vqa_questions(self, split: str) -> Path:
        return self.vqa_dir / vqa_question_file(COCO_TAGS[_check_split(split)])

    def vqa_annotations(self, split: str) -> Path:
        return self.vqa_dir / vqa_annotation_file(COCO_TAGS[_check_split(split)])

    def coco_image_dir(self, split: str) -> Path:
        return self.coco_images / COCO_TAGS[_check_split(split)]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def benchmark_files(root: str | os.PathLike) -> BenchmarkFiles:
    """The layout of a benchmark under ``root`` (does not check that it exists)."""
    root = Path(root).resolve()
    return BenchmarkFiles(
        root=root,
        coco_images=root / "coco",
        karpathy_json=root / "coco" / "dataset_coco.json",
        vqa_dir=root / "vqa",
        ve_images=root / "snli_ve" / "flickr30k_images",
        ve_jsonl={s: root / "snli_ve" / f"snli_ve_{VE_SPLITS[s]}.jsonl" for s in SPLITS},
    )


def _progress(total: int, description: str, enabled: bool):
    return tqdm(total=total, desc=description, disable=not enabled, unit="img", leave=False)


def _split_scenes(
    config: SynthConfig, split: str, count: int, occluder_rate: float, stream_offset: int
) -> Iterator[tuple[int, Scene, Any]]:
    """Yield ``(index, scene, rng for text)`` for one split; training/validation exclude held-out pairs."""
    heldout = heldout_combinations(config.heldout_pairs, config.seed)
    seen_pairs = [c for c in all_combinations() if c not in heldout]
    for index in range(count):
        rng = scene_rng(config.seed, split, index, stream_offset + _SCENE)
        if split == "test":
            allowed = all_combinations()
            required = heldout if heldout and rng.random() < config.heldout_test_fraction else []
        else:
            allowed, required = seen_pairs, []
        occluded = rng.random() < occluder_rate
        scene = sample_scene(rng, image_size=config.image_size, min_objects=config.min_objects,
                             max_objects=config.max_objects, allowed=allowed, required=required,
                             occluder=occluded)
        yield index, scene, scene_rng(config.seed, split, index, stream_offset + _TEXT)


def generate_benchmark(
    out_dir: str | os.PathLike, config: SynthConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Generate the benchmark under ``out_dir`` (replacing a previous one there) and return its meta dict.

    The text-only baselines (:func:`vlpeft.data.baselines.text_only_baselines`) are computed and stored in the
    meta file under ``"text_only_baselines"``.
    """
    config = config or SynthConfig()
    files = benchmark_files(out_dir)
    started = time.perf_counter()
    files.root.mkdir(parents=True, exist_ok=True)
    (files.root / META_FILE).unlink(missing_ok=True)
    for stale in (files.coco_images, files.vqa_dir, files.ve_images.parent):
        if stale.exists():
            shutil.rmtree(stale)
    heldout = heldout_combinations(config.heldout_pairs, config.seed)
    forbidden_by_split = {"train": heldout, "val": heldout, "test": []}
    counts: dict[str, Any] = {}
    heldout_ids: dict[str, list[int]] = {"coco_test": [], "ve_test": []}

    karpathy_images = []
    for split_index, split in enumerate(SPLITS):
        tag = COCO_TAGS[split]
        image_dir = files.coco_images / tag
        image_dir.mkdir(parents=True, exist_ok=True)
        vqa_items = []
        n_images = config.images[split_index]
        with _progress(n_images, f"synth coco {split}", progress) as bar:
            for index, scene, text_rng in _split_scenes(config, split, n_images, 0.0, 0):
                image_id = _COCO_ID_BASE[split] + index
                _save(scene, config, split, index, 0, image_dir / coco_file_name(tag, image_id))
                if split == "test" and scene.combinations() & set(heldout):
                    heldout_ids["coco_test"].append(image_id)
                questions = make_questions(scene, text_rng, config.questions_per_image, forbidden_by_split[split])
                answer_rng = scene_rng(config.seed, split, index, _ANSWERS)
                for k, question in enumerate(questions):
                    answers = human_answers(question, answer_rng, config.annotator_noise)
                    vqa_items.append((image_id * 1000 + k, image_id, question, answers))
                captions = make_inventory_captions(scene, text_rng, config.captions_per_image)
                karpathy_images.append((split, tag, image_id, captions))
                bar.update(1)
        write_vqa_split(files.vqa_dir, tag, vqa_items)
        counts[f"coco_{split}_images"] = n_images
        counts[f"vqa_{split}_questions"] = len(vqa_items)
    write_karpathy_captions(files.karpathy_json, karpathy_images)

    files.ve_images.mkdir(parents=True, exist_ok=True)
    for split_index, split in enumerate(SPLITS):
        ve_items = []
        n_images = config.ve_images[split_index]
        with _progress(n_images, f"synth snli-ve {split}", progress) as bar:
            for index, scene, text_rng in _split_scenes(config, split, n_images, 0.5, 10):
                flickr_id = _FLICKR_ID_BASE[split] + index
                _save(scene, config, split, index, 10, files.ve_images / f"{flickr_id}.jpg")
                if split == "test" and scene.combinations() & set(heldout):
                    heldout_ids["ve_test"].append(flickr_id)
                premise = make_captions(scene, text_rng, 1)[0]
                hypotheses = make_hypotheses(scene, text_rng, config.hypotheses_per_image, forbidden_by_split[split])
                ve_items.extend((flickr_id, premise, k, h) for k, h in enumerate(hypotheses))
                bar.update(1)
        write_snli_ve_split(files.ve_jsonl[split], ve_items)
        counts[f"ve_{split}_images"] = n_images
        counts[f"ve_{split}_pairs"] = len(ve_items)

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "heldout_combinations": [list(c) for c in heldout],
        "counts": counts,
        "files": _relative_files(files),
        "heldout_image_ids": heldout_ids,
        "vocabulary": vocabulary(),
        "caption_style": CAPTION_STYLE,
    }
    meta["text_only_baselines"] = text_only_baselines(files)
    meta["generation_seconds"] = round(time.perf_counter() - started, 2)
    tmp = files.root / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, files.root / META_FILE)
    return meta


def _save(scene: Scene, config: SynthConfig, split: str, index: int, stream_offset: int, path: Path) -> None:
    image = render_scene(scene, scene_rng(config.seed, split, index, stream_offset + _RENDER))
    image.save(path, format="JPEG", quality=config.jpeg_quality)


def _relative_files(files: BenchmarkFiles) -> dict[str, Any]:
    def rel(p: Path) -> str:
        return str(p.relative_to(files.root))

    return {
        "coco_images": rel(files.coco_images),
        "karpathy_json": rel(files.karpathy_json),
        "vqa_questions": {s: rel(files.vqa_questions(s)) for s in SPLITS},
        "vqa_annotations": {s: rel(files.vqa_annotations(s)) for s in SPLITS},
        "ve_images": rel(files.ve_images),
        "ve_jsonl": {s: rel(p) for s, p in files.ve_jsonl.items()},
    }


def load_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The meta dict of a complete benchmark under ``root``, or ``None`` when there is none."""
    path = Path(root) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_benchmark(
    out_dir: str | os.PathLike, config: SynthConfig | None = None, *, progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Reuse the benchmark under ``out_dir`` if it is complete and was made with ``config``; else generate it."""
    config = config or SynthConfig()
    meta = load_meta(out_dir)
    if meta is not None and meta.get("format_version") == FORMAT_VERSION and meta.get("config") == config.to_json():
        log(f"using the synthetic benchmark in {out_dir}")
        return meta
    log(f"generating the synthetic benchmark in {out_dir} ...")
    return generate_benchmark(out_dir, config, progress=progress)


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with its ``synth`` sub-command) on a ``vlpeft`` sub-parser set."""
    data = subparsers.add_parser("data", help="built-in data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser(
        "synth",
        help="generate the built-in synthetic VL benchmark (VQAv2 / SNLI-VE / COCO Karpathy formats)",
        description=__doc__.split("\n\n")[0],
    )
    synth.add_argument("--out", required=True, help="output folder (replaced if it holds a benchmark)")
    synth.add_argument("--preset", choices=sorted(PRESETS), default="default", help="size preset (default: default)")
    synth.add_argument("--seed", type=int, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, help="image side in pixels (default 64)")
    synth.add_argument("--images", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                       help="COCO-style scenes per split (VQA + captions)")
    synth.add_argument("--ve-images", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                       help="entailment scenes per split")
    synth.add_argument("--questions-per-image", type=int)
    synth.add_argument("--hypotheses-per-image", type=int)
    synth.add_argument("--max-objects", type=int)
    synth.add_argument("--heldout-pairs", type=int, help="(colour, shape) pairs kept out of training (default 4)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bars")
    synth.set_defaults(handler=run_synth)
    return synth


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of a preset with the command-line overrides applied."""
    overrides = {
        "seed": args.seed,
        "image_size": args.image_size,
        "images": tuple(args.images) if args.images else None,
        "ve_images": tuple(args.ve_images) if args.ve_images else None,
        "questions_per_image": args.questions_per_image,
        "hypotheses_per_image": args.hypotheses_per_image,
        "max_objects": args.max_objects,
        "heldout_pairs": args.heldout_pairs,
    }
    return dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``vlpeft data synth``: generate, then print the counts and the text-only baselines."""
    config = config_from_args(args)
    meta = generate_benchmark(args.out, config, progress=not args.no_progress)
    print(f"wrote the synthetic benchmark to {Path(args.out).resolve()} in {meta['generation_seconds']} s")
    for key, value in meta["counts"].items():
        print(f"  {key:>24}: {value}")
    print("held-out (colour, shape) pairs (test only): "
          + ", ".join(f"{c} {s}" for c, s in meta["heldout_combinations"]))
    print("text-only baselines on the test split (no image):")
    for line in format_baselines(meta["text_only_baselines"]):
        print("  " + line)
    return 0


def format_baselines(baselines: dict[str, Any]) -> list[str]:
    """Human-readable lines for the ``text_only_baselines`` meta entry."""
    vqa, ve, cap = baselines["vqa"], baselines["snli_ve"], baselines["caption"]
    ve_rule = "overall" if ve["best"] == "overall" else f"per {ve['best']}"
    return [
        f"VQA accuracy {vqa['accuracy']:.2f} (majority answer per {vqa['best']})",
        f"SNLI-VE accuracy {ve['accuracy']:.2f} (majority label {ve_rule})",
        f"caption CIDEr {cap['CIDEr']:.3f} (the most frequent training caption for every image: {cap['caption']!r})",
    ]
