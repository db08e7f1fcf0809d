"""Data builders, one source per file; importing this package registers them (`medm data build NAME`)."""

from medm.data.builders import (
    phantoms,  # noqa: F401
    vqa_rad,  # noqa: F401
)
