"""Data builders, one source per file; importing this package registers them (`medm data build NAME`)."""

from medm.data.builders import (
    flare25,  # noqa: F401
    grounding,  # noqa: F401
    iu_xray,  # noqa: F401
    m3d,  # noqa: F401
    medmnist,  # noqa: F401
    medtrinity,  # noqa: F401
    medxpertqa,  # noqa: F401
    mmmu,  # noqa: F401
    omnimedvqa,  # noqa: F401
    openi_zh,  # noqa: F401
    pathvqa,  # noqa: F401
    phantoms,  # noqa: F401
    phantoms3d,  # noqa: F401
    pmc_vqa,  # noqa: F401
    slake,  # noqa: F401
    spine,  # noqa: F401
    spine_synthetic,  # noqa: F401
    vqa_rad,  # noqa: F401
)
