"""Record what ``vlpeft demo`` builds, without data, a base model or any training.

The expensive steps are replaced by stand-ins (benchmark generation, base pretraining, the vision-tower export,
``run_training`` and ``evaluate``); everything the demo decides itself runs for real: the method specs, the plan
(titles, fingerprints, order), every training config handed to ``config_from_dict``, the reference evaluations,
``runs.jsonl``, the results JSON and markdown, the log, and the CLI's arguments to ``run_demo``.

``python tests/demo/demo_plan_capture.py`` writes :data:`FIXTURE`; it was first run on the code before the demo was
split into settings (commit cdce402), and ``test_demo_plan_equality.py`` compares today's code with it. Intended
changes of what the demo builds regenerate it in the same commit (issue #17: seeds and intervals, per-method
learning rates from a table or selected with ``run_sweep``, which is a stand-in here too, and 100 caption steps).
The scenarios read the learning-rate table :data:`TABLE_ENTRIES` (written into the scenario's folder), not the
committed one, so that the reference does not change when the committed table does.
Stand-ins are installed on every loaded ``vlpeft`` module attribute that *is* the original function, so the
capture works whichever module imports what.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import sys
import tempfile
import types
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).with_name("data") / "demo_plans.json"
TASK_METRICS = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr"}


def _entry(label: str, task: str, rate: float, preset: str = "default", setting: str = "blip") -> dict[str, Any]:
    return {"setting": setting, "label": label, "task": task, "learning_rate": rate, "base_preset": preset,
            "eval_scores": {"0.001": 1.0, f"{rate:g}": 2.0}, "size": "default", "selection_seeds": [0],
            "command": "vlpeft demo --select-learning-rates (fixture)", "git": {"commit": "f" * 40, "dirty": False}}


#: The learning-rate table the scenarios read: BLIP entries on the default base (one for another base preset, one
#: of the composite setting).
TABLE_ENTRIES: list[dict[str, Any]] = [
    _entry("LoRA", "vqa", 0.003), _entry("LoRA", "caption", 0.03), _entry("Adapter", "vqa", 0.01),
    _entry("full fine-tuning", "vqa", 0.0003), _entry("p-adapter (release)", "caption", 0.01),
    _entry("LoRA", "snli_ve", 0.02, preset="smoke"), _entry("LoRA", "vqa", 0.001, setting="composite"),
]


def _import_demo_modules() -> None:
    import vlpeft.demo

    for info in pkgutil.walk_packages(vlpeft.demo.__path__, "vlpeft.demo."):
        importlib.import_module(info.name)
    importlib.import_module("vlpeft.training")
    importlib.import_module("vlpeft.data.synth")


@contextlib.contextmanager
def _replaced(originals: dict[str, Callable[..., Any]], fakes: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Point every ``vlpeft*`` module attribute that is ``originals[name]`` at ``fakes[name]``."""
    undo = []
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or not module.__name__.startswith("vlpeft"):
            continue
        for name, original in originals.items():
            if module.__dict__.get(name) is original:
                undo.append((module, name, original))
                setattr(module, name, fakes[name])
    try:
        yield
    finally:
        for module, name, original in undo:
            setattr(module, name, original)


def _normalise(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _normalise(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v, root) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return value.replace(root, "<ROOT>")
    return value


def _score(name: str) -> float:
    return (zlib.crc32(name.encode()) % 1000) / 10.0


def _text_model(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}), encoding="utf-8")
    save_file({"w": torch.zeros(3, 4)}, str(folder / "model.safetensors"))
    return folder


def _stand_ins(root: Path, events: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(originals, fakes) for the steps the capture does not run."""
    from vlpeft import training
    from vlpeft.data import synth
    from vlpeft.demo import base, composite, selection

    def ensure_benchmark(out_dir, config=None, *, progress=True, log=print):
        events.append(["ensure_benchmark", str(out_dir), config.to_json()])
        return {"counts": {"vqa": {"train": 3}}, "heldout_combinations": [["red", "cube"], ["blue", "ball"]],
                "text_only_baselines": {"vqa": {"accuracy": 41.5}, "snli_ve": {"accuracy": 35.25},
                                        "caption": {"CIDEr": 0.125}}}

    def ensure_base(spec=None, root_dir=None, *, progress=True, log=print):
        path = root / "base"
        path.mkdir(parents=True, exist_ok=True)
        vision = {"image_size": spec.image_size, "patch_size": spec.patch_size}
        config = {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"], "vision_config": vision}
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        events.append(["ensure_base", dataclasses.asdict(spec), None if root_dir is None else str(root_dir)])
        return path, {"digest": spec.digest(), "parameters": 12345, "train_seconds": 7.0,
                      "caption_scores": {"CIDEr": 0.75, "Bleu_4": 0.5}, "spec": dataclasses.asdict(spec)}

    def export_vision_tower(base_dir, out_dir=None, *, check=True):
        events.append(["export_vision_tower", str(base_dir), out_dir, check])
        return Path(base_dir).with_name(Path(base_dir).name + "-vit")

    real_config_from_dict = training.config_from_dict

    def config_from_dict(data, base_dir="."):
        events.append(["config", json.loads(json.dumps(data))])
        return real_config_from_dict(data, base_dir)

    def run_training(config, callbacks=()):
        name = Path(config.run.output_dir).name
        events.append(["run_training", name, [type(c).__name__ for c in callbacks]])
        metric = TASK_METRICS[config.task.type]
        return types.SimpleNamespace(metric=metric, metrics={"test": {metric: _score(name)}}, trainable_params=100,
                                     total_params=1000 + len(name), wall_time_s=2.5)

    def evaluate(config, checkpoint=None, split="test"):
        events.append(["evaluate", str(checkpoint), split])
        return {TASK_METRICS[config.task.type]: _score(Path(config.run.output_dir).name)}

    def run_sweep(config, grid, out_dir=None, *, command="vlpeft sweep", config_file=None, log=print):
        name = Path(out_dir).name
        events.append(["run_sweep", name, list(grid.learning_rates), list(grid.seeds), command])
        scores = {lr: _score(f"{name}-{lr:g}") for lr in grid.learning_rates}
        best = max(grid.learning_rates, key=lambda lr: scores[lr])
        one = {lr: {"n": 1, "mean": scores[lr], "std": None, "ci95": None} for lr in grid.learning_rates}
        return {
            "metric": TASK_METRICS[config.task.type], "grid": grid.to_json(), "command": command,
            "git": {"commit": "0" * 40, "dirty": False}, "written_at": "2026-01-01T00:00:00+0000",
            "runs": [{"learning_rate": lr, "seed": seed, "status": "finished", "eval": scores[lr],
                      "eval_metrics": {}, "output_dir": str(out_dir), "trainable_params": 100}
                     for lr in grid.learning_rates for seed in grid.seeds],
            "per_value": [{"learning_rate": lr, "status": "finished", "eval": one[lr],
                           "eval_scores": {str(seed): scores[lr] for seed in grid.seeds}} for lr in grid.learning_rates],
            "selected": {"learning_rate": best, "eval": one[best],
                         "test": {"scores": {str(seed): _score(f"{name}-test") for seed in grid.seeds}}},
        }

    originals = {"ensure_benchmark": synth.ensure_benchmark, "ensure_base": base.ensure_base,
                 "export_vision_tower": composite.export_vision_tower, "config_from_dict": training.config_from_dict,
                 "run_training": training.run_training, "evaluate": training.evaluate,
                 "run_sweep": selection.run_sweep}
    fakes = {"ensure_benchmark": ensure_benchmark, "ensure_base": ensure_base,
             "export_vision_tower": export_vision_tower, "config_from_dict": config_from_dict,
             "run_training": run_training, "evaluate": evaluate, "run_sweep": run_sweep}
    return originals, fakes


def _size(setting: str, name: str, **changes: Any) -> Any:
    """A demo size by name (``changes`` give a custom size, as ``run_demo(size_name=DemoSize)`` takes)."""
    from vlpeft.demo import run

    sizes = run.SIZES if setting == "blip" else importlib.import_module("vlpeft.demo.composite").COMPOSITE_SIZES
    return dataclasses.replace(sizes[name], **changes) if changes else name


#: (name, setting, run_demo keyword arguments); ``size`` is (size name, custom changes)
SCENARIOS: list[tuple[str, str, dict[str, Any]]] = [
    ("blip-smoke", "blip", {"size": ("smoke", {}), "seeds": [0, 1], "routing_kinds": ["mul", "matmul"]}),
    ("blip-full-some", "blip", {"size": ("full", {}), "seeds": [0], "routing_kinds": ["mul", "add", "matmul",
                                                                                       "matmul_expand"],
                                "methods": ["LoRA", "p_adapter", "routed LoRA (add)"], "tasks": ["vqa", "caption"]}),
    ("blip-custom", "blip", {"size": ("smoke", {"lr_scale": 4.0, "steps_ve": 250, "batch_size": 16}),
                             "seeds": [3], "methods": ["full fine-tuning"], "tasks": ["snli_ve"]}),
    ("blip-default-table", "blip", {"size": ("default", {}), "seeds": [0, 1],
                                    "methods": ["full fine-tuning", "LoRA", "Adapter", "p-adapter (release)"]}),
    ("blip-select", "blip", {"size": ("smoke", {"lr_scale": 2.0}), "seeds": [0, 1, 2], "learning_rates": "select",
                             "methods": ["full fine-tuning", "LoRA", "Adapter"], "tasks": ["vqa", "snli_ve"],
                             "lr_grid": (0.001, 0.01), "selection_seeds": (0, 5)}),
    ("blip-select-only", "blip", {"size": ("default", {}), "seeds": [0], "select_only": True, "update_table": True,
                                  "methods": ["LoRA", "routed LoRA (matmul)"], "tasks": ["caption"]}),
    ("blip-shared", "blip", {"size": ("default", {}), "seeds": [0], "learning_rates": "shared",
                             "methods": ["LoRA", "Adapter"], "tasks": ["vqa"]}),
    ("composite-smoke", "composite", {"size": ("smoke", {}), "seeds": [0, 1], "routing_kinds": ["add", "matmul"]}),
    ("composite-default", "composite", {"size": ("default", {}), "seeds": [2], "routing_kinds": ["mul"],
                                        "methods": ["lora", "routed_adapter"], "tasks": ["snli_ve"]}),
]

#: argv of ``vlpeft demo`` whose ``run_demo`` call is recorded
CLI_ARGVS: list[list[str]] = [
    ["demo"],
    ["demo", "--full", "--jobs", "2"],
    ["demo", "--select-learning-rates", "--lr-table", "t.json", "--update-table", "--lr-grid", "0.001", "0.01",
     "--selection-seeds", "0", "1", "--methods", "LoRA", "routed LoRA (matmul)"],
    ["demo", "--lr", "shared", "--seeds", "4"],
    ["demo", "--setting", "composite", "--text-model", "tm", "--size", "smoke", "--routing", "add", "mul",
     "--methods", "LoRA", "--tasks", "vqa", "--seeds", "3", "4", "--no-progress", "--out", "o", "--data", "d",
     "--base", "b"],
]

#: run_demo calls that must fail, and their messages
BAD_CALLS: list[dict[str, Any]] = [
    {"setting": "clip"},
    {"text_model": "somewhere"},
    {"size_name": "huge"},
    {"setting": "composite", "size_name": "huge"},
    {"routing_kinds": ["sum"]},
    {"setting": "composite", "routing_kinds": ["sum"]},
    {"tasks": ["vqa", "ocr"]},
    {"tasks": []},
    {"seeds": []},
    {"jobs": 0},
    {"methods": ["QLoRA"]},
    {"setting": "composite", "methods": ["p-adapter (paper)"]},
    {"setting": "composite", "tasks": ["caption"], "methods": ["LoRA"]},
    {"learning_rates": "tuned"},
    {"lr_table": "<BAD_TABLE>"},
]


def _run_scenario(root: Path, setting: str, options: dict[str, Any]) -> dict[str, Any]:
    from vlpeft.demo.run import run_demo

    options = dict(options)
    size_name, changes = options.pop("size")
    events: list[Any] = []
    logs: list[str] = []
    originals, fakes = _stand_ins(root, events)
    text = _text_model(root / "text") if setting == "composite" else None
    table = _table(root)
    with _replaced(originals, fakes):
        payload = run_demo(root / "out", data_dir=root / "data", base_dir=root / "base",
                           size_name=_size(setting, size_name, **changes), setting=setting, text_model=text,
                           progress=False, command="vlpeft demo (capture)", log=logs.append, lr_table=table,
                           **options)
    if options.get("select_only"):
        files = sorted(p.name for p in (root / "out").iterdir())
        return _normalise({"payload": payload, "events": events, "markdown": json.loads(table.read_text()),
                           "runs": _runs(root), "log": logs, "files": files,
                           "saved_json_is_the_payload": json.loads((root / "out" / "learning_rates.json").read_text())
                           ["entries"] == payload["learning_rates"]}, str(root))
    stem = "results_composite" if setting == "composite" else "results"
    saved = json.loads((root / "out" / f"{stem}.json").read_text(encoding="utf-8"))
    payload_before = json.loads(json.dumps(payload))
    for key in ("machine", "total_seconds", "setup_seconds", "threads_per_run"):
        payload.pop(key)
    for result in payload["runs"]:
        result["threads"] = None
    markdown = [line for line in (root / "out" / f"{stem}.md").read_text(encoding="utf-8").splitlines()
                if not line.startswith(("- Machine:", "- Total time:", "- Parallelism:"))]
    logs = [re.sub(r" in [0-9.]+ min$", " in <T> min", line) for line in logs]
    files = sorted(p.name for p in (root / "out").iterdir())
    return _normalise({"payload": payload, "events": events, "markdown": markdown, "runs": _runs(root), "log": logs,
                       "files": files, "saved_json_is_the_payload": saved == payload_before}, str(root))


def _runs(root: Path) -> list[dict[str, Any]]:
    runs = [json.loads(line) for line in (root / "out" / "runs.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"fingerprint": r["fingerprint"], "label": r["result"]["label"], "task": r["result"]["task"],
             "seed": r["result"]["seed"], "metric": r["result"]["metric"],
             "learning_rate": r["result"].get("learning_rate")} for r in runs]


def _table(root: Path) -> Path:
    """The scenarios' learning-rate table (:data:`TABLE_ENTRIES`) in ``root``."""
    from vlpeft.demo.learning_rates import write_table

    return write_table(root / "lr_table.json", TABLE_ENTRIES)


def _cli_calls() -> list[Any]:
    import argparse

    from vlpeft.demo import run

    calls: list[Any] = []

    def fake_run_demo(out_dir, **kwargs):
        calls.append({"out_dir": out_dir, **{k: v for k, v in kwargs.items() if k != "log"}})
        return {}

    parser = argparse.ArgumentParser(prog="vlpeft")
    run.add_parser(parser.add_subparsers(dest="command"))
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "120"
    helps = []
    try:
        # the default --jobs depends on the machine's cores: recorded as on two cores
        with _replaced({"run_demo": run.run_demo, "default_jobs": run.default_jobs},
                       {"run_demo": fake_run_demo, "default_jobs": lambda: 2}):
            for argv in CLI_ARGVS:
                sys.argv = ["vlpeft", *argv]
                args = parser.parse_args(argv)
                namespace = {k: v for k, v in vars(args).items() if k != "handler"}
                assert args.handler(args) == 0
                calls[-1] = {"namespace": namespace, "handler": args.handler.__name__, "run_demo": calls[-1]}
        helps = parser._subparsers._group_actions[0].choices["demo"].format_help().splitlines()
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    # paths inside the checkout (the default --lr-table) are recorded relative to it, so any clone compares equal
    repo = str(Path(run.__file__).resolve().parents[2])
    return [json.loads(json.dumps(_normalise(calls, "\0")).replace(json.dumps(repo)[1:-1], "<REPO>")), helps]


def _bad_calls(root: Path) -> list[Any]:
    from vlpeft.demo.run import run_demo

    out = []
    events: list[Any] = []
    originals, fakes = _stand_ins(root, events)
    text = _text_model(root / "text")
    bad_table = root / "bad_table.json"
    bad_table.write_text(json.dumps({"format_version": 1, "entries": [{"label": "LoRA"}]}), encoding="utf-8")
    for kwargs in BAD_CALLS:
        call = {"size_name": "smoke", "lr_table": _table(root), **kwargs}
        if call["lr_table"] == "<BAD_TABLE>":
            call["lr_table"] = bad_table
        if call.get("setting") == "composite" and "text_model" not in call:
            call["text_model"] = text
        try:
            with _replaced(originals, fakes):
                run_demo(root / "out-bad", data_dir=root / "data", base_dir=root / "base", progress=False,
                         log=lambda _: None, **call)
        except Exception as error:  # noqa: BLE001  (recorded: type and message)
            out.append([type(error).__name__, str(error).replace(str(root), "<ROOT>")])
        else:
            out.append(None)
    return out


def capture() -> dict[str, Any]:
    """Everything the demo builds for :data:`SCENARIOS`, :data:`CLI_ARGVS` and :data:`BAD_CALLS`."""
    _import_demo_modules()
    record: dict[str, Any] = {"scenarios": {}}
    for name, setting, options in SCENARIOS:
        with tempfile.TemporaryDirectory(prefix="demo-capture-") as tmp:
            record["scenarios"][name] = _run_scenario(Path(tmp).resolve(), setting, options)
    record["cli"], record["help"] = _cli_calls()
    with tempfile.TemporaryDirectory(prefix="demo-capture-") as tmp:
        record["errors"] = _bad_calls(Path(tmp).resolve())
    return record


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(capture(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
