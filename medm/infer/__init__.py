"""Inference: batched generation and streaming, shared by `medm infer`, eval and the playground.

Names load on first use, so `medm.cli` can import `medm.infer.cli` without importing torch.
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "GenerationSettings": "medm.infer.generate", "Predictor": "medm.infer.generate",
    "predictor_for": "medm.infer.generate", "stream_text": "medm.infer.generate",
    **{name: "medm.infer.predictions" for name in (
        "InferenceResult", "PredictionFileError", "load_predictions", "prediction_row", "question_text",
        "read_predictions", "run_inference")},
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
