"""Training, evaluation and prediction on Hugging Face Trainer.

Python API::

    from vlpeft.training import load_config, run_training, evaluate, predict

    config = load_config("configs/blip_padapter_vqav2.yaml", ["optim.learning_rate=2e-4"])
    result = run_training(config)          # RunResult; result.summary_line()
    metrics = evaluate(config, checkpoint=result.output_dir)
    records = predict(config, checkpoint=result.output_dir, output="predictions.json")
"""

from vlpeft.training.checkpoints import CorruptCheckpointWarning, find_resume_checkpoint
from vlpeft.training.config import (
    ConfigError,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from vlpeft.training.methods import METHODS, MethodEntry, register_training_method
from vlpeft.training.run import RunResult, evaluate, format_summary, predict, run_training
from vlpeft.training.trainer import TrainingDivergedError
from vlpeft.training.validation import validate_config

__all__ = [
    "ConfigError",
    "CorruptCheckpointWarning",
    "EvalConfig",
    "METHODS",
    "MethodConfig",
    "MethodEntry",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "RunResult",
    "TaskConfig",
    "TrainConfig",
    "TrainingDivergedError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "find_resume_checkpoint",
    "format_summary",
    "load_config",
    "predict",
    "register_training_method",
    "run_training",
    "save_config",
    "validate_config",
]
