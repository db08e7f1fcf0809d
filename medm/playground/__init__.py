"""The Gradio playground: chat with a model about an image or a volume (`python playground.py`, `medm playground`).

Built on `medm.infer.Predictor` (generation, streaming) and the dataset's own image / volume loaders. Names load on
first use, so `medm.cli` can import `medm.playground.cli` without importing torch.
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "Session": "medm.playground.chat",
    "Upload": "medm.playground.media", "UploadError": "medm.playground.media", "open_upload": "medm.playground.media",
    "Example": "medm.playground.model_info", "load_examples": "medm.playground.model_info",
    "model_markdown": "medm.playground.model_info", "model_rows": "medm.playground.model_info",
    "DEFAULT_WINDOW": "medm.playground.viewer", "WINDOW_CHOICES": "medm.playground.viewer",
    "SliceViewer": "medm.playground.viewer",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
