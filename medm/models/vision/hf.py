"""Any transformers vision tower (`vision.name: hf`): DINOv2 (RAD-DINO), ViT, DeiT, CLIP, SigLIP, ... built by
`AutoModel` from the config of `model_type` (or `path`'s config.json)."""

from medm.models.vision._hf import HFEncoder
from medm.registry import VISION


@VISION.register("hf")
class AutoVisionEncoder(HFEncoder):
    """A transformers vision model chosen by its config's `model_type` (no Python per architecture).

    Token counts (CLS, distillation and register tokens before the patch grid) are measured from the model, so
    `patch` drops them whatever the architecture. Where the architecture is in `medm.models.vision._hf.HF_ARCHITECTURES`
    (CLIP, SigLIP, DINOv2, ViT, DeiT) the blocks after `select_layer` and the final norm / pooler are known unused, and
    the default mean/std are the model's; elsewhere mean/std default to 0.5 (or `path`'s preprocessor).
    """
