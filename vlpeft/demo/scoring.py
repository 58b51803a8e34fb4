"""One demo fine-tuning run: train a config with the shared training API, score the test split, time the steps."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from vlpeft.report.demo_results import DemoRunResult
from vlpeft.training import TrainConfig, run_training

__all__ = ["StepTimer", "folder_name", "run_folder", "train_and_score"]


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step (``on_step_begin`` -> ``on_step_end``)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None
        return control

    def median(self) -> float | None:
        # the first step pays one-off costs (allocation, lazy initialisation): leave it out when possible
        values = self.durations[1:] or self.durations
        return statistics.median(values) if values else None


def folder_name(task: str, label: str) -> str:
    """``vqa-routed_LoRA_matmul``: a (task, method) as a folder name."""
    return f"{task}-{label.replace(' ', '_').replace('(', '').replace(')', '')}"


def run_folder(work_dir: Path, task: str, label: str, seed: int) -> Path:
    """The scratch folder of one run (removed when the run is scored)."""
    return work_dir / f"{folder_name(task, label)}-s{seed}"


def train_and_score(config: TrainConfig, label: str, task: str, seed: int) -> DemoRunResult:
    """Fine-tune with ``config``, evaluate on the test split, time the steps; the run folder is removed
    afterwards."""
    output_dir = Path(config.run.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    timer = StepTimer()
    result = run_training(config, callbacks=[timer])
    test = result.metrics.get("test", {})
    if result.metric not in test:
        raise RuntimeError(f"{label} on {task}: the test evaluation did not report {result.metric!r} "
                           f"(got {sorted(test)})")
    shutil.rmtree(output_dir, ignore_errors=True)
    return DemoRunResult(label, task, seed, float(test[result.metric]), result.trainable_params,
                         result.total_params, timer.median(), round(result.wall_time_s, 2),
                         learning_rate=config.optim.learning_rate)
