"""Inference: batched generation and streaming, shared by `medm infer`, eval and the playground."""

from medm.infer.generate import GenerationSettings, Predictor
from medm.infer.predictions import (
    InferenceResult,
    PredictionFileError,
    load_predictions,
    prediction_row,
    question_text,
    read_predictions,
    run_inference,
)

__all__ = [
    "GenerationSettings", "InferenceResult", "PredictionFileError", "Predictor", "load_predictions", "prediction_row",
    "question_text", "read_predictions", "run_inference",
]
