"""Training checkpoints: their home is medm.models.checkpoint (save, load, formats); `export_merged` is
medm.interop.merge. These names stay importable from here."""

from medm.interop.merge import export_merged
from medm.models.checkpoint import (
    BASE_DIR,
    COMPONENTS_FILE,
    COMPONENTS_ONLY,
    FULL,
    LORA,
    META_FILE,
    base_dir,
    load_components,
    load_full_state,
    load_init_weights,
    load_state_into,
    load_trained,
    read_meta,
    relocate_meta,
    save_components,
    write_meta,
)

__all__ = ["BASE_DIR", "COMPONENTS_FILE", "COMPONENTS_ONLY", "FULL", "LORA", "META_FILE", "base_dir",
           "export_merged", "load_components", "load_full_state", "load_init_weights", "load_state_into",
           "load_trained", "read_meta", "relocate_meta", "save_components", "write_meta"]
