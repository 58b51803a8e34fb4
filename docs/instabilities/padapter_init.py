"""Does p-adapter start as the identity? (docs/instabilities.md) The demo's SNLI-VE recipe at step 0: the adapted
model's logits and test accuracy against the base model's (the same PeftModel with its adapters disabled).

usage: padapter_init.py BASE DATA OUT LABEL KEY=VALUE ...   (method options, e.g. variant=paper mu0=0.1)
One JSON line per call is appended to OUT/padapter_init.jsonl.
"""
import json
import sys
from pathlib import Path

import torch
import yaml

import vlpeft.training.run as run_module
from vlpeft.data.synth import benchmark_files
from vlpeft.training import config_from_dict
from vlpeft.training.trainer import VLPeftTrainer
from vlpeft.training.validation import validate_config


def main(base, data, out, label, *options):
    files = benchmark_files(data)
    method = {"type": "p_adapter", "key_pool_size": 17}  # the demo caps k = 24 at the base's 17 image tokens
    method.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)})
    config = config_from_dict({
        "model": {"name": base},
        "method": method,
        "task": {"type": "snli_ve", "train": str(files.ve_jsonl["train"]), "test": str(files.ve_jsonl["test"]),
                 "images": str(files.ve_images), "inference": "rank", "max_length": 32,
                 "max_train_samples": 6000, "max_eval_samples": 300},
        "optim": {"eval_batch_size": 64},
        "eval": {"strategy": "no", "num_beams": 1, "rank_top_k": 4, "load_best_at_end": False},
        "run": {"output_dir": str(Path(out) / "padapter-init-scratch"), "seed": 0, "report_to": [],
                "progress_bar": False},
    })
    plan = validate_config(config, for_training=True)
    assembled = run_module._assemble(config, plan)
    model, task = assembled.model.eval(), assembled.task
    batch = task.collate([task.test_dataset[i] for i in range(32)])
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    mask = batch["labels"] != -100 if "labels" in batch else torch.ones(adapted.shape[:2], dtype=torch.bool)
    mask = mask[:, : adapted.shape[1]]
    diff = (adapted - plain).abs()
    kl = torch.nn.functional.kl_div(adapted.log_softmax(-1), plain.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    args = run_module._training_arguments(config, plan, has_eval=False)
    trainer = VLPeftTrainer(model=model, args=args, data_collator=task.collate, task=task)
    accuracy = trainer.evaluate(task.test_dataset, metric_key_prefix="test")["test_accuracy"]
    with model.disable_adapter():
        base_accuracy = trainer.evaluate(task.test_dataset, metric_key_prefix="test")["test_accuracy"]
    resolved = model.peft_config["default"]
    record = {"label": label, "variant": resolved.variant, "mu0": resolved.mu0, "p_init": resolved.p_init,
              "init_weights": resolved.init_weights,
              "max_abs_logit_diff": round(float(diff.max()), 4),
              "mean_abs_logit_diff": round(float(diff.mean()), 4),
              "base_logit_std": round(float(plain.std()), 4),
              "mean_kl_next_token": round(float(kl[mask].mean()), 4),
              "accuracy_at_init": round(accuracy, 2), "base_accuracy": round(base_accuracy, 2)}
    with open(Path(out) / "padapter_init.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
