"""`MedMForConditionalGeneration`: vision encoder -> connector -> features placed in an HF causal LM.

Reads top to bottom like transformers' `modeling_llava.py`: output type, tower glue, the
`PreTrainedModel` base, then the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from medm.models.configuration_medm import MedMConfig
from medm.models.llm import build_llm
from medm.registry import CONNECTOR, VISION


@dataclass
class MedMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the connector outputs of the images in the batch.

    image_features: (n_images, M, D_llm) or None; image3d_features: (n_volumes, M3, D_llm) or None.
    """

    image_features: torch.FloatTensor | None = None
    image3d_features: torch.FloatTensor | None = None


def build_tower(vision: dict, connector: dict, llm_hidden: int) -> tuple[nn.Module, nn.Module]:
    """Encoder + connector from their config sections; the connector is sized from the encoder geometry."""
    enc_kwargs = {k: v for k, v in vision.items() if k != "name"}
    encoder = VISION.build(vision["name"], **enc_kwargs)
    con_kwargs = {k: v for k, v in connector.items() if k != "name"}
    conn = CONNECTOR.build(connector["name"], in_dim=encoder.hidden_size, out_dim=llm_hidden, grid=encoder.grid,
                           num_prefix_tokens=encoder.num_prefix_tokens, **con_kwargs)
    return encoder, conn


def idle_tower_zero(encoder: nn.Module, connector: nn.Module, blank: torch.Tensor) -> torch.Tensor:
    """A 0 that depends on every parameter of a tower: its features for one blank input, summed, times 0.

    Nothing when the tower is frozen and its weights live whole on this rank (plain DDP, one process): then no
    other rank waits for it. Trained batch norms run in eval mode here, so the blank leaves their running
    statistics alone. blank: (1, ...) one preprocessed blank image or volume.
    """
    params = [p for m in (encoder, connector) for p in m.parameters()]
    # ZeRO-3 marks its partitioned parameters with `ds_id`: every rank must then gather them in the same order.
    if not any(p.requires_grad or hasattr(p, "ds_id") for p in params):
        return blank.new_zeros(())
    norms = [m for m in (*encoder.modules(), *connector.modules())
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        features = connector(encoder(blank))
    finally:
        for m in norms:
            m.train()
    return features.sum() * 0


def place_features(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, features: torch.Tensor | None,
                   token_id: int, what: str) -> torch.Tensor:
    """Scatter (n, M, D) feature rows into the positions of `token_id`, in reading order.

    Raises ValueError when the number of placeholder tokens differs from the number of feature rows.
    """
    mask = input_ids == token_id
    n_tokens = int(mask.sum())
    n_rows = 0 if features is None else features.shape[0] * features.shape[1]
    if n_tokens != n_rows:
        raise ValueError(f"{what} tokens and {what} features do not match: {n_tokens} {what} tokens in input_ids, "
                         f"{n_rows} feature rows from the connector")
    if n_rows == 0:
        return inputs_embeds
    rows = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), rows)


class MedMPreTrainedModel(PreTrainedModel):
    config: MedMConfig
    config_class = MedMConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MedMForConditionalGeneration(MedMPreTrainedModel, GenerationMixin):
    """Vision encoder(s) + connector(s) + any HF causal LM (kept whole as `self.llm`).

    Inputs carry one `<image>` id per visual token (expanded by the data code); `pixel_values` holds every
    image of the batch in reading order, `pixel_values_3d` every volume.
    """

    medm_kind = "medm"  # its entry in medm.registry.KIND (medm.models.kind)

    def __init__(self, config: MedMConfig, llm: PreTrainedModel | None = None):
        """`llm`: an LLM already loaded (medm.models.builder passes the pretrained one, so a random one of the same
        size is never built first); None: built from `config.text_config` with random weights."""
        super().__init__(config)
        attn = config.llm.get("attn_implementation", "sdpa")
        self.llm = llm if llm is not None else build_llm(config.text_config, attn,
                                                          bool(config.llm.get("trust_remote_code")))
        # One config object for the LLM, so resizing embeddings updates what `save_pretrained` writes.
        config.text_config = self.llm.config
        hidden = config.text_config.hidden_size
        self.vision = self.connector = self.vision3d = self.connector3d = None
        if config.vision is not None:
            self.vision, self.connector = build_tower(config.vision, config.connector, hidden)
        if config.vision3d is not None:
            self.vision3d, self.connector3d = build_tower(config.vision3d, config.connector3d, hidden)
        self.post_init()

    def train(self, mode: bool = True):
        """`nn.Module.train`, except that batch norms whose weights are frozen stay in eval mode.

        A frozen CNN encoder (timm ResNet, ConvNeXt-with-BN, ...) would otherwise normalise with batch statistics
        and overwrite its running statistics at every training step: frozen weights, drifting features.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters(recurse=False))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(
                        p.requires_grad for p in params):
                    module.eval()
        return self

    # ---- token geometry -------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` tokens one image expands to (0 without a 2D tower)."""
        return self.connector.num_tokens if self.connector is not None else 0

    @property
    def num_image3d_tokens(self) -> int:
        return self.connector3d.num_tokens if self.connector3d is not None else 0

    # ---- embeddings, delegated to the LLM ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    # ---- features -----------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (n_images, C, H, W) -> (n_images, M, D_llm)."""
        if self.vision is None:
            raise ValueError("this model has no 2D vision encoder, but pixel_values were given")
        return self.connector(self.vision(pixel_values))

    def get_image3d_features(self, pixel_values_3d: torch.Tensor) -> torch.Tensor:
        """pixel_values_3d: (n_volumes, C, D, H, W) -> (n_volumes, M3, D_llm)."""
        if self.vision3d is None:
            raise ValueError("this model has no 3D vision encoder, but pixel_values_3d were given")
        return self.connector3d(self.vision3d(pixel_values_3d))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_values_3d: torch.Tensor | None = None):
        """Token embeddings with image / volume features in place: (B, T) -> (B, T, D_llm).

        In training, a tower this batch gives nothing to still runs, on a blank input whose features are added
        times 0 (`idle_tower_zero`): every rank then runs the same modules in the same order and every trainable
        parameter gets a gradient (0), so a text-only batch on one rank and an image batch on another neither
        breaks DDP's gradient reduction nor desynchronises ZeRO-3's parameter gathering.
        """
        embeds = self.get_input_embeddings()(input_ids)
        image_features = image3d_features = None
        if pixel_values is not None and pixel_values.shape[0]:
            image_features = self.get_image_features(pixel_values)
        elif self.training and self.vision is not None:
            embeds = embeds + idle_tower_zero(self.vision, self.connector, self._blank("vision", embeds.device))
        if self.config.image_token_id is not None:
            embeds = place_features(input_ids, embeds, image_features, self.config.image_token_id, "image")
        elif image_features is not None:
            raise ValueError("pixel_values given but the config has no image_token_id")
        if pixel_values_3d is not None and pixel_values_3d.shape[0]:
            image3d_features = self.get_image3d_features(pixel_values_3d)
        elif self.training and self.vision3d is not None:
            embeds = embeds + idle_tower_zero(self.vision3d, self.connector3d, self._blank("vision3d", embeds.device))
        if self.config.image3d_token_id is not None:
            embeds = place_features(input_ids, embeds, image3d_features, self.config.image3d_token_id, "image3d")
        elif image3d_features is not None:
            raise ValueError("pixel_values_3d given but the config has no image3d_token_id")
        return embeds, image_features, image3d_features

    def _blank(self, slot: str, device: torch.device) -> torch.Tensor:
        """(1, C, H, W) blank image (`vision`) or (1, C, D, H, W) blank volume (`vision3d`) the encoder takes."""
        cache = self.__dict__.setdefault("_blanks", {})
        if slot not in cache:
            cfg = getattr(self.config, slot)
            cache[slot] = VISION.get(cfg["name"]).preprocessor(cfg).blank().unsqueeze(0)
        return cache[slot].to(device)

    # ---- forward and generation ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_3d: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MedMCausalLMOutput:
        """input_ids: (B, T); attention_mask: (B, T); labels: (B, T) with -100 where not supervised;
        pixel_values: (n_images, C, H, W); pixel_values_3d: (n_volumes, C, D, H, W).

        Packed rows (medm.data.packing): `position_ids` (B, T) restarting at 0 for every sample and no
        `attention_mask`; transformers then keeps each sample's attention to itself (a block-diagonal causal mask
        for eager / sdpa / flex, varlen kernels for flash attention with the collator's `cu_seq_lens_*`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if use_cache is None and past_key_values is None and (
                labels is not None or (attention_mask is None and position_ids is not None)):
            # A loss pass needs no KV cache (the LLM would build one from its config's `use_cache`); and sample
            # boundaries are read from `position_ids` only when there is no cache, so packed rows must not get one.
            use_cache = False
        image_features = image3d_features = None
        if inputs_embeds is None:
            inputs_embeds, image_features, image3d_features = self.embed(input_ids, pixel_values, pixel_values_3d)
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return MedMCausalLMOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                                  hidden_states=out.hidden_states, attentions=out.attentions,
                                  image_features=image_features, image3d_features=image3d_features)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, pixel_values_3d=None,
                                      is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Images are encoded once, in the prefill; later steps read them from the KV cache.
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["pixel_values"] = pixel_values
            inputs["pixel_values_3d"] = pixel_values_3d
        return inputs


def register_auto_classes() -> None:
    """Let `AutoConfig` / `AutoModelForCausalLM` open medm checkpoints (idempotent)."""
    try:
        AutoConfig.register("medm", MedMConfig)
        AutoModelForCausalLM.register(MedMConfig, MedMForConditionalGeneration)
    except ValueError:
        pass
