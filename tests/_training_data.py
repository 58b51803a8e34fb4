"""Tiny generated datasets in the standard formats, and tiny run configs, for the training/CLI/recipe tests.

Images are 32x32 PNGs whose colour determines the answers, so a model can in principle learn the tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def _images(folder: Path, count: int, tag: str, first_id: int) -> list[tuple[int, str, str]]:
    """Write ``count`` images; returns (image id, file name, colour name)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    out = []
    for i in range(count):
        image_id = first_id + i
        colour = names[i % len(names)]
        name = f"COCO_{tag}_{image_id:012d}.png"
        image = Image.new("RGB", (32, 32), COLOURS[colour])
        image.paste((255, 255, 255), (4 + i % 8, 4, 12 + i % 8, 12))
        image.save(folder / name)
        out.append((image_id, name, colour))
    return out


def write_caption_data(root: Path, n_train: int = 8, n_eval: int = 4) -> dict[str, str]:
    """COCO-format caption files (``captions_train.json``, ``captions_val.json``) + images."""
    files = {}
    for split, count, first in (("train", n_train, 1), ("val", n_eval, 1000)):
        images = _images(root / "images" / f"{split}2014", count, f"{split}2014", first)
        data: dict[str, Any] = {"images": [], "annotations": []}
        ann_id = 1
        for image_id, name, colour in images:
            data["images"].append({"id": image_id, "file_name": name})
            for caption in (f"a {colour} square", f"a square that is {colour}"):
                data["annotations"].append({"image_id": image_id, "id": ann_id, "caption": caption})
                ann_id += 1
        path = root / f"captions_{split}.json"
        path.write_text(json.dumps(data))
        files[split] = str(path)
    files["images"] = str(root / "images")
    return files


def write_vqa_data(root: Path, n_train: int = 8, n_eval: int = 4) -> dict[str, str]:
    """Official VQAv2 question + annotation files and an answer list."""
    files = {}
    for split, count, first in (("train", n_train, 1), ("val", n_eval, 1000)):
        images = _images(root / "images" / f"{split}2014", count, f"{split}2014", first)
        questions, annotations = [], []
        for image_id, _, colour in images:
            qid = image_id * 10
            questions.append({"image_id": image_id, "question": "what colour is it?", "question_id": qid})
            answers = [{"answer": colour, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": "what color",
                                "answer_type": "other", "multiple_choice_answer": colour, "answers": answers})
        q = root / f"questions_{split}.json"
        a = root / f"annotations_{split}.json"
        q.write_text(json.dumps({"questions": questions}))
        a.write_text(json.dumps({"annotations": annotations}))
        files[split], files[f"{split}_annotations"] = str(q), str(a)
    answer_list = root / "answer_list.json"
    answer_list.write_text(json.dumps(sorted(COLOURS)))
    files["answer_list"] = str(answer_list)
    files["images"] = str(root / "images")
    return files


def write_snli_ve_data(root: Path, n_train: int = 8, n_eval: int = 4) -> dict[str, str]:
    """SNLI-VE jsonl files + images (``<Flickr30K_ID>.png``)."""
    files = {}
    labels = ("entailment", "contradiction", "neutral")
    for split, count, first in (("train", n_train, 1), ("dev", n_eval, 1000)):
        folder = root / "flickr30k_images"
        images = _images(folder, count, "x", first)
        lines = []
        for k, (image_id, name, colour) in enumerate(images):
            (folder / name).rename(folder / f"{image_id}.png")
            label = labels[k % 3]
            hypothesis = {"entailment": f"the square is {colour}.", "contradiction": "the square is black.",
                          "neutral": "the square is old."}[label]
            lines.append(json.dumps({"Flickr30K_ID": str(image_id), "sentence2": hypothesis,
                                     "gold_label": label, "pairID": f"{image_id}-{k}"}))
        path = root / f"snli_ve_{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    files["images"] = str(root / "flickr30k_images")
    return files


def tiny_caption_config(data: dict[str, str], output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny BLIP-caption LoRA run on ``write_caption_data`` files (steps-based eval/checkpoints)."""
    config: dict[str, Any] = {
        "model": {"tiny": "blip_caption"},
        "method": {"type": "lora", "r": 4, "lora_alpha": 8},
        "task": {"type": "caption", "train": data["train"], "eval": data["val"], "images": data["images"],
                 "prompt": "a picture of", "max_length": 16},
        "optim": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 4},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 4, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 7, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
