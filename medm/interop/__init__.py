"""Interoperability: transformers' LLaVA format (export and import) and model cards.

Names load on first use, so `medm.cli` can import `medm.interop.cli` without importing transformers' models.
"""

from medm._lazy import lazy_exports

_EXPORTS = {
    "ExportError": "medm.interop.llava_hf", "ImportFormatError": "medm.interop.llava_hf",
    "check_exportable": "medm.interop.llava_hf", "export_llava_hf": "medm.interop.llava_hf",
    "import_llava_hf": "medm.interop.llava_hf", "llava_config": "medm.interop.llava_hf",
    "to_llava": "medm.interop.llava_hf", "to_llava_state_dict": "medm.interop.llava_hf",
    "from_llava_state_dict": "medm.interop.llava_hf",
    "render_model_card": "medm.interop.model_card",
    "write_model_card": "medm.interop.model_card",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
