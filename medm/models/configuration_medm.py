"""`MedMConfig`: the composite config that rebuilds a medm model with no hub access."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MedMConfig(PreTrainedConfig):
    """Names and plain values only, so `config.json` round-trips.

    Args:
        text_config: the LLM's own HF config (any causal LM `model_type`).
        llm: medm settings of the LLM: `family` (LLM registry name), `path` (where weights came from,
            informational once saved), `dtype`, `attn_implementation`, `trust_remote_code`, `lora_target_modules`.
        vision, vision3d: resolved encoder settings: `name` (VISION registry name) plus that encoder's keys,
            including its full architecture `config`. `None` when the model has no such tower.
        connector, connector3d: `name` (CONNECTOR registry name) plus that connector's keys.
        template: registered chat template name, or `None` for the tokenizer's own chat template.
        system_prompt: default system prompt for rendering conversations (`None`: the template's default).
        image_token_id, image3d_token_id: tokenizer ids of `<image>` / `<image3d>`.
    """

    model_type = "medm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PreTrainedConfig | None = None
    llm: dict[str, Any] | None = None
    vision: dict[str, Any] | None = None
    connector: dict[str, Any] | None = None
    vision3d: dict[str, Any] | None = None
    connector3d: dict[str, Any] | None = None
    template: str | None = None
    system_prompt: str | None = None
    image_token_id: int | None = None
    image3d_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.llm = dict(self.llm or {})
        for slot in ("vision", "vision3d"):
            paired = "connector" + slot[len("vision"):]
            if (getattr(self, slot) is None) != (getattr(self, paired) is None):
                raise ValueError(f"`{slot}` and `{paired}` come together: set both or neither")
