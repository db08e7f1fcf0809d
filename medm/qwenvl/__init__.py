"""Qwen-VL fine-tuning as the `qwen-vl` model kind: same records, commands, stage plans and evaluation as the medm
kind; the model is transformers' own Qwen2-VL / Qwen2.5-VL / Qwen3-VL and the records are rendered with its processor.

    medm train configs/train/finetune_qwenvl.yaml model=configs/model/tiny-qwen2.5-vl.yaml data.path=train.json

Names load on first use (the model classes import transformers' Qwen-VL modules).
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "QwenVLArgs": "medm.qwenvl.args", "BOX_FORMATS": "medm.qwenvl.args", "MODEL_TYPES": "medm.qwenvl.args",
    "build_qwenvl": "medm.qwenvl.model", "load_qwenvl": "medm.qwenvl.model", "QwenVLMixin": "medm.qwenvl.model",
    "QWENVL_CLASSES": "medm.qwenvl.model",
    "QwenVLDataset": "medm.qwenvl.data", "QwenVLCollator": "medm.qwenvl.data", "QwenVLInputs": "medm.qwenvl.data",
    "ImageGeometry": "medm.qwenvl.data",
    "QwenVLPredictor": "medm.qwenvl.infer",
    "to_model": "medm.qwenvl.boxes", "from_model": "medm.qwenvl.boxes",
    "tiny_qwenvl_config": "medm.qwenvl.tiny",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
