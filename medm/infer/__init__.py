"""Inference: batched generation and streaming, shared by `medm infer`, eval and the playground.

Names load on first use, so `medm.cli` can import `medm.infer.cli` without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "GenerationSettings": "medm.infer.generate", "Predictor": "medm.infer.generate",
    "predictor_for": "medm.infer.generate", "stream_text": "medm.infer.generate",
    **{name: "medm.infer.predictions" for name in (
        "InferenceResult", "PredictionFileError", "load_predictions", "prediction_row", "question_text",
        "read_predictions", "run_inference")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medm.infer' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
