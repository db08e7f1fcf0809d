"""HF CLIP vision tower (`vision.name: clip`): the `hf` encoder with `model_type: clip_vision_model` pinned."""

from typing import Any

from transformers import CLIPVisionConfig, CLIPVisionModel

from medm.models.vision._hf import HFVisionEncoder
from medm.registry import VISION


@VISION.register("clip")
class CLIPEncoder(HFVisionEncoder):
    """CLIP ViT; `patch` drops the CLS token. Default mean/std are OpenAI CLIP's. `post_layernorm` (applied to the
    pooled CLS token only) is never reached by the features."""

    model_type = "clip_vision_model"
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    num_cls_tokens = 1

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "num_channels": 3}}
