"""HF SigLIP vision tower (`vision.name: siglip`): the `hf` encoder with `model_type: siglip_vision_model` pinned."""

from typing import Any

from transformers import SiglipVisionConfig, SiglipVisionModel

from medm.models.vision._hf import HFVisionEncoder
from medm.registry import VISION


@VISION.register("siglip")
class SiglipEncoder(HFVisionEncoder):
    """SigLIP ViT. It has no CLS token, so `patch` and `cls_patch` both give every patch token (`skip_first` drops
    the top-left one, as LLaVA's and TinyLLaVA's SigLIP models do).

    `select_layer: -1` is the last encoder layer's output before `post_layernorm` (what `hidden_states[-1]`
    holds). Set `config.vision_use_head: false` to drop the attention-pooling head, which the features never use.
    Default mean/std are SigLIP's (0.5, 0.5, 0.5).
    """

    model_type = "siglip_vision_model"
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    num_cls_tokens = 0

    @classmethod
    def tiny(cls, section: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "num_channels": 3,
                           "vision_use_head": False}}
