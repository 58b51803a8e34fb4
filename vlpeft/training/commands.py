"""``vlpeft train``, ``vlpeft eval`` and ``vlpeft predict`` sub-commands."""

from __future__ import annotations

import argparse
import json
import sys

from vlpeft.tasks.bad_input import BadInputPolicy
from vlpeft.training.config import ConfigError, load_config, use_tiny_twin
from vlpeft.training.run import evaluate, predict, run_training
from vlpeft.training.task_binding import answer_list, check_answer_coverage, load_datasets
from vlpeft.training.validation import validate_config

__all__ = ["add_parser"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML), e.g. configs/blip_padapter_vqav2.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.learning_rate=2e-4 --set method.r=16 (repeatable)",
    )
    parser.add_argument(
        "--tiny-twin",
        action="store_true",
        help="swap the model for the tiny random-config twin the recipe declares (model.tiny_twin): a smoke test "
        "of the whole pipeline without downloading the model",
    )


def _load(args: argparse.Namespace):
    config = load_config(args.config, args.overrides)
    return use_tiny_twin(config) if args.tiny_twin else config


def _check_answer_coverage(config) -> None:
    """``train --check`` on VQA: read the data files (image files checked to exist, not decoded) and the answer
    list, print how many questions it cannot answer, and refuse as training would (no model is loaded)."""
    datasets = load_datasets(config, image_check="exists")
    coverage = check_answer_coverage(config, datasets, answer_list(config, datasets[0]))
    if coverage is not None:
        print(coverage.line())


def _check_data(config) -> None:
    """``train --check --deep``: read every data file and decode every image as training would (no model is
    loaded), then report the answer-list coverage (VQA) and what ``task.bad_input: skip``/``warn`` would leave out.
    Under ``raise`` the first bad record stops the check with its file and record named."""
    policy = BadInputPolicy(config.task.bad_input)
    datasets = load_datasets(config, image_check="decode", policy=policy)
    sizes = {split: len(d) for split, d in zip(("train", "eval", "test"), datasets, strict=True) if d is not None}
    print("data OK: " + ", ".join(f"{split} {n} records" for split, n in sizes.items()) + " (every image decoded)")
    if config.task.type == "vqa":
        coverage = check_answer_coverage(config, datasets, answer_list(config, datasets[0]))
        if coverage is not None:
            print(coverage.line())
    if policy.counts:
        print(policy.report())


def _train(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.deep and not args.check:
        raise ConfigError("--deep goes with --check (train always reads and decodes its data before loading a model)")
    if args.check:
        plan = validate_config(config)
        if args.deep:
            _check_data(config)
        elif config.task.type == "vqa":
            _check_answer_coverage(config)
        print(f"config OK: family={plan.family} method={config.method.type} metric={plan.metric}")
        return 0
    result = run_training(config)
    print(f"vlpeft train: {result.summary_line()} | output {result.output_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate(_load(args), args.checkpoint, split=args.split)
    print(json.dumps(metrics, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    records = predict(_load(args), args.checkpoint, split=args.split,
                      output=args.output)
    print(f"vlpeft predict: wrote {len(records)} predictions to {args.output}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``, ``eval`` and ``predict``."""
    train = subparsers.add_parser("train", help="train (and evaluate) a config; resumes from the last checkpoint")
    _common(train)
    train.add_argument("--check", action="store_true", help="validate the config and exit (no model is loaded)")
    train.add_argument("--deep", action="store_true",
                       help="with --check: also read every data file and decode every image (no model is loaded)")
    train.set_defaults(handler=_train)

    evaluation = subparsers.add_parser("eval", help="evaluate a trained run or checkpoint with the task metric")
    _common(evaluation)
    evaluation.add_argument("--checkpoint", required=True, help="run folder or checkpoint-N folder")
    evaluation.add_argument("--split", default="eval", choices=("eval", "test"), help="which task file (default eval)")
    evaluation.set_defaults(handler=_evaluate)

    prediction = subparsers.add_parser(
        "predict", help="write predictions in the official submission format (VQA / COCO / SNLI-VE JSON)"
    )
    _common(prediction)
    prediction.add_argument("--checkpoint", required=True, help="run folder or checkpoint-N folder")
    prediction.add_argument("--split", default="test", choices=("eval", "test"), help="which task file (default test)")
    prediction.add_argument("--output", required=True, help="predictions JSON file to write")
    prediction.set_defaults(handler=_predict)
