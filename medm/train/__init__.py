"""Training: stage plans on the HF Trainer (DeepSpeed / torchrun for scale-out), checkpoints and export.

Names load on first use, so `medm.cli` can import `medm.train.cli` without importing the Trainer.
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "LoraArgs": "medm.train.args", "StagePlan": "medm.train.args", "TrainArgs": "medm.train.args",
    "TrainConfig": "medm.train.args", "load_train_config": "medm.train.args", "parse_train_config": "medm.train.args",
    "apply_plan": "medm.train.stages", "resolve_plan": "medm.train.stages",
    "trainable_parameter_names": "medm.train.stages",
    "MedMTrainer": "medm.train.trainer", "run_training": "medm.train.trainer",
    "export_merged": "medm.interop.merge", "load_trained": "medm.models.checkpoint",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
