"""The demo's SNLI-VE recipe (400 steps of batch 32, lr 5e-3, 300 test pairs) with p-adapter and given method
options (docs/instabilities.md). usage: padapter_train.py BASE DATA OUT SEED LR KEY=VALUE ...
The run folder goes under OUT; one JSON line per run is appended to OUT/padapter_train.jsonl."""
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from vlpeft.data.synth import benchmark_files
from vlpeft.training import config_from_dict, run_training


def main(base, data, out_root, seed, lr, *options):
    files = benchmark_files(data)
    method = {"type": "p_adapter", "key_pool_size": 17}  # the demo caps k = 24 at the base's 17 image tokens
    method.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)})
    name = "-".join(["ve", *(o.replace("=", "") for o in options), f"s{seed}", f"lr{lr}"])
    out = Path(out_root) / name
    config = config_from_dict({
        "model": {"name": base},
        "method": method,
        "task": {"type": "snli_ve", "train": str(files.ve_jsonl["train"]), "test": str(files.ve_jsonl["test"]),
                 "images": str(files.ve_images), "inference": "rank", "max_length": 32,
                 "max_train_samples": 6000, "max_eval_samples": 300},
        "optim": {"learning_rate": float(lr), "max_steps": 400, "batch_size": 32, "eval_batch_size": 64,
                  "warmup_ratio": 0.05, "lr_scheduler": "linear", "weight_decay": 0.0},
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4, "load_best_at_end": False},
        "run": {"output_dir": str(out), "seed": int(seed), "report_to": [], "resume": "never", "logging_steps": 50,
                "progress_bar": False, "save_total_limit": 2},
    })
    started = time.time()
    result = run_training(config)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {e["step"]: round(e["loss"], 3) for e in state["log_history"] if "loss" in e}
    labels = Counter(p["label"] for p in json.loads((out / "predictions_test.json").read_text()))
    record = {"options": options, "seed": int(seed), "lr": float(lr),
              "accuracy": round(result.metrics["test"]["accuracy"], 2), "losses": losses,
              "predicted_labels": dict(labels), "wall_s": round(time.time() - started, 1)}
    with open(Path(out_root) / "padapter_train.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
