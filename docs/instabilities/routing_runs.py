"""Routing collapse on VQA (docs/instabilities.md): one run of the demo's VQA recipe with a routed LoRA whose x_R
comes from a chosen source, or the x_R norm statistics of the sources.

usage: routing_runs.py run BASE DATA OUT_JSONL KIND SOURCE LR [STEPS]   (run folder next to OUT_JSONL)
       routing_runs.py norms BASE DATA
KIND: mul | matmul | matmul_expand | none (plain LoRA); SOURCE: mean (demo: mean of the post-LayerNorm vision tokens),
tanh (tanh of that mean: bounded in (-1, 1) per coordinate, same information), pooler (BLIP's pooler output,
LayerNorm of the CLS token), scaled:<c> (the mean times c).
"""
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import vlpeft.training.run as run_module
from vlpeft.data.synth import benchmark_files
from vlpeft.training import config_from_dict, run_training


class XR(nn.Module):
    """x_R = f(mean over the vision tokens of the post-LayerNorm features), (images, d)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, sequence):
        mean = sequence.mean(dim=1)
        if self.kind == "tanh":
            return torch.tanh(mean)
        return mean * float(self.kind.split(":")[1])  # scaled:<c>


def add_source(model, kind):
    """Give BLIP's vision model a child ``xr`` called on its output (a forward hook), for routing to read."""
    vision = model.vision_model
    vision.xr = XR(kind)

    def call_xr(module, args, output):
        module.xr(output.last_hidden_state)  # returns None: the vision output itself is unchanged

    vision.register_forward_hook(call_xr)
    return model


def config(base, data, kind, source, lr, steps, out):
    files = benchmark_files(data)
    if kind == "none":
        method = {"type": "lora", "r": 8, "lora_alpha": 16}
    else:
        method = {"type": "routed_lora", "r": 8, "lora_alpha": 16, "routing": kind}
        if source == "pooler":
            method["pooling"] = "pooler"
        elif source != "mean":
            method.update(visual_feature_module="vision_model.xr", visual_feature_output="tensor")
    # the demo's VQA recipe (vlpeft/demo/run.py at 2839f37: task_section + schedule_sections, size default)
    return config_from_dict({
        "model": {"name": base},
        "method": method,
        "task": {"type": "vqa", "train": str(files.vqa_questions("train")),
                 "train_annotations": str(files.vqa_annotations("train")),
                 "test": str(files.vqa_questions("test")), "test_annotations": str(files.vqa_annotations("test")),
                 "images": str(files.coco_images), "inference": "rank", "max_length": 32,
                 "max_train_samples": 9000, "max_eval_samples": 300},
        "optim": {"learning_rate": lr, "max_steps": steps, "batch_size": 32, "eval_batch_size": 64,
                  "warmup_ratio": 0.05, "lr_scheduler": "linear", "weight_decay": 0.0},
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4, "load_best_at_end": False},
        "run": {"output_dir": out, "seed": 0, "report_to": [], "resume": "never", "logging_steps": 50,
                "progress_bar": False, "save_total_limit": 2},
    })


def run(base, data, jsonl, kind, source, lr, steps=400):
    lr, steps = float(lr), int(steps)
    out = Path(jsonl).parent / f"{kind}-{source}-{lr:g}-{steps}".replace(":", "")
    if kind != "none" and source not in ("mean", "pooler"):
        load = run_module.load_model
        run_module.load_model = lambda *a, **k: add_source(load(*a, **k), source)
    started = time.time()
    result = run_training(config(base, data, kind, source, float(lr), int(steps), str(out)))
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {e["step"]: round(e["loss"], 3) for e in state["log_history"] if "loss" in e}
    answers = Counter(p["answer"] for p in json.loads((out / "predictions_test.json").read_text()))
    top, n = answers.most_common(1)[0]
    record = {"kind": kind, "source": source, "lr": float(lr), "steps": int(steps),
              "vqa_accuracy": round(result.metrics["test"]["vqa_accuracy"], 2), "losses": losses,
              "top_answer": top, "top_answer_share": round(n / sum(answers.values()), 3),
              "distinct_answers": len(answers), "wall_s": round(time.time() - started, 1)}
    with open(jsonl, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


@torch.no_grad()
def norms(base, data):
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from vlpeft.tasks import BadInputPolicy, VQADataset

    files = benchmark_files(data)
    model = BlipForConditionalGeneration.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    dataset = VQADataset.from_official(files.vqa_questions("test"), files.vqa_annotations("test"), files.coco_images,
                                       policy=BadInputPolicy("raise"))
    images = [dataset[i]["image"] for i in range(0, 3 * 256, 3)]
    out = model.vision_model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    tokens, pooled = out.last_hidden_state, out.pooler_output
    sources = {"token (post-LN)": tokens.reshape(-1, tokens.shape[-1]), "mean": tokens.mean(1),
               "tanh": torch.tanh(tokens.mean(1)), "pooler": pooled}
    torch.manual_seed(0)
    a = torch.empty(8, tokens.shape[-1])
    nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # LoRA's A at init (r = 8)
    for name, x in sources.items():
        v = x @ a.t()
        print(f"{name:>16}: |x_R| mean {x.norm(dim=-1).mean():.2f} (min {x.norm(dim=-1).min():.2f}, max "
              f"{x.norm(dim=-1).max():.2f}), max |coordinate| {x.abs().max():.2f}; |A x_R|^2 mean "
              f"{(v.norm(dim=-1) ** 2).mean():.3f}; mean pairwise cosine {_cosine(x):.3f}")


def _cosine(x):
    x = nn.functional.normalize(x[:256], dim=-1)
    c = x @ x.t()
    n = c.shape[0]
    return float((c.sum() - n) / (n * (n - 1)))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "norms":
        norms(*sys.argv[2:4])
    else:
        run(*sys.argv[2:])
