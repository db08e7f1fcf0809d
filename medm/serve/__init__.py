"""A trained model for a person at a terminal (`medm chat`) or for programs over HTTP (`medm serve`, an
OpenAI-compatible API). Both go through `medm.infer.Predictor`; names load on first use, so `medm.cli` builds its
parser without importing torch.
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "ChatLoop": "medm.serve.chat", "build_app": "medm.serve.api", "Batcher": "medm.serve._batcher",
    "RequestError": "medm.serve._requests",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
