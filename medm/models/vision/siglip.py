"""HF SigLIP vision tower (`vision.name: siglip`)."""

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

    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    after_layers = ("post_layernorm", "head")
    num_cls_tokens = 0
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)
