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


def write_chat_data(root: Path, n_train: int = 6, n_eval: int = 4) -> dict[str, str]:
    """Conversation data in both supported layouts over the same images: LLaVA JSON (``llava_{split}.json``,
    ``<image>`` placeholders, one and two images per record, a 2-turn conversation) and JSONL with ``messages`` /
    ``images`` columns (``messages_{split}.jsonl``); image paths are relative to ``images``. Final answers are
    single colour words (short answers)."""
    folder = root / "images"
    images = _images(folder, n_train + n_eval + 1, "chat", 1)
    files: dict[str, str] = {"images": str(folder)}
    splits = {"train": images[:n_train], "val": images[n_train:n_train + n_eval]}
    extra = images[-1][1]
    for split, rows in splits.items():
        llava, messages = [], []
        for k, (image_id, name, colour) in enumerate(rows):
            two = k % 3 == 1
            turns = [{"from": "human", "value": "<image>\n" + ("<image>\nwhat colour is the first ?" if two
                                                               else "what colour is the square ?")},
                     {"from": "gpt", "value": colour}]
            if k % 3 == 2:
                turns = [{"from": "human", "value": "<image>\ndescribe this image ."},
                         {"from": "gpt", "value": f"a {colour} square"},
                         {"from": "human", "value": "what colour is it ?"}, {"from": "gpt", "value": colour}]
            llava.append({"id": f"{split}-{image_id}", "image": [name, extra] if two else name,
                          "conversations": turns})
            content = [{"type": "image"}] * (2 if two else 1) + [{"type": "text", "text": "what colour is it ?"}]
            messages.append({"messages": [{"role": "user", "content": content},
                                          {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                             "images": [name, extra] if two else [name]})
        (root / f"llava_{split}.json").write_text(json.dumps(llava))
        (root / f"messages_{split}.jsonl").write_text("\n".join(json.dumps(m) for m in messages) + "\n")
        files[f"llava_{split}"] = str(root / f"llava_{split}.json")
        files[f"messages_{split}"] = str(root / f"messages_{split}.jsonl")
    return files
