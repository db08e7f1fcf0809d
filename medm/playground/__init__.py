"""The Gradio playground: chat with a model about an image or a volume (`python playground.py`, `medm playground`).

Built on `medm.infer.Predictor` (generation, streaming) and the dataset's own image / volume loaders.
"""

from medm.playground.chat import Session
from medm.playground.media import Upload, UploadError, open_upload
from medm.playground.model_info import Example, load_examples, model_markdown, model_rows
from medm.playground.viewer import DEFAULT_WINDOW, WINDOW_CHOICES, SliceViewer

__all__ = ["DEFAULT_WINDOW", "WINDOW_CHOICES", "Example", "Session", "SliceViewer", "Upload", "UploadError",
           "load_examples", "model_markdown", "model_rows", "open_upload"]
