"""Data builders, one source per file; importing this package registers them (`medm data build NAME`)."""

from medm.data.builders import (
    grounding,  # noqa: F401
    medmnist,  # noqa: F401
    medtrinity,  # noqa: F401
    pathvqa,  # noqa: F401
    phantoms,  # noqa: F401
    phantoms3d,  # noqa: F401
    slake,  # noqa: F401
    spine,  # noqa: F401
    vqa_rad,  # noqa: F401
)
