"""HF CLIP vision tower (`vision.name: clip`)."""

from transformers import CLIPVisionConfig, CLIPVisionModel

from medm.models.vision._hf import HFVisionEncoder
from medm.registry import VISION


@VISION.register("clip")
class CLIPEncoder(HFVisionEncoder):
    """CLIP ViT; `patch` drops the CLS token. Default mean/std are OpenAI CLIP's."""

    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    after_layers = ("post_layernorm",)  # applied to the pooled CLS token only
    num_cls_tokens = 1
    default_mean = (0.48145466, 0.4578275, 0.40821073)
    default_std = (0.26862954, 0.26130258, 0.27577711)
