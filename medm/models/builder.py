"""Assemble a model and its tokenizer from a model config (the medm kind here; other kinds through `KIND`)."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from medm.config import ConfigError, arg, check_arguments, from_dict, not_allowed, to_dict, unknown_key
from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN
from medm.models._chat_templates import CHAT_TEMPLATES
from medm.models._hub import require_available
from medm.models.checkpoint import (  # noqa: F401  (their old home; medm.models.checkpoint is theirs now)
    checkpoint_kind,
    load_model,
    load_processing,
    refuse_missing_weights,
    save_model,
)
from medm.models.configuration_medm import MedMConfig
from medm.models.llm import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    load_llm,
    remote_code,
    resolve_dtype,
    resolve_text_config,
)
from medm.models.modeling_medm import MedMForConditionalGeneration, register_auto_classes
from medm.models.tiny import tiny_tokenizer
from medm.models.vision._hf import HFEncoder
from medm.qwenvl.args import QwenVLArgs
from medm.registry import CONNECTOR, KIND, LLM, TEMPLATE, VISION

logger = logging.getLogger(__name__)

# Constructor arguments a connector gets from the model, not from its config section.
_CONNECTOR_GEOMETRY = {"self", "in_dim", "out_dim", "grid", "num_prefix_tokens"}


@dataclass
class LLMArgs:
    family: str = arg("auto", "LLM family (registry name): qwen2, llama, phi3, phi, auto; sets LoRA targets etc.")
    path: str | None = arg(None, "local directory or hub id of a pretrained causal LM; null: random init from `config`")
    config: dict | None = arg(None, "HF config of the LLM as a mapping with `model_type` (used when `path` is null)")
    tokenizer: str | None = arg(None, "tokenizer directory or hub id; default: `path`")
    tiny_tokenizer: str | None = arg(None, "train a tiny BPE tokenizer in-process with this chat format: "
                                           "chatml, llama3, phi3, none (tests and demo)", choices=CHAT_TEMPLATES)
    dtype: str = arg("float32", "weights dtype: float32, bfloat16, float16", choices=DTYPES)
    attn_implementation: str = arg("sdpa", "eager, sdpa, sdpa_varlen (sdpa per sample of packed rows), or "
                                           "flash_attention_2 (GPU, needs flash-attn)",
                                   choices=ATTN_IMPLEMENTATIONS)
    trust_remote_code: bool = arg(False, "run model code shipped with the checkpoint; off unless you trust it")
    lora_target_modules: list | None = arg(None, "LoRA target modules; default: the family's")


@dataclass
class ModelArgs:
    kind: str = arg("medm", "model kind: medm (vision encoder + connector + causal LM, the sections below) or qwen-vl "
                            "(a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model with its own processor: the `qwenvl` section)")
    qwenvl: QwenVLArgs | None = arg(None, "Qwen-VL settings (kind: qwen-vl): path or config, box_format, pixels")
    llm: LLMArgs = arg(None, "the language model")
    vision: dict | None = arg(None, "2D vision encoder: `name` (registry) plus that encoder's keys")
    connector: dict | None = arg(None, "2D connector: `name` (registry) plus that connector's keys")
    vision3d: dict | None = arg(None, "3D vision encoder: `name` plus its keys")
    connector3d: dict | None = arg(None, "3D connector: `name` plus its keys")
    template: str | None = arg(None, "registered chat template; null: the tokenizer's own chat template")
    system_prompt: str | None = arg(None, "system prompt for every conversation; null: the template's default")

    def __post_init__(self):
        if self.llm is None:
            self.llm = LLMArgs()


def parse_model_args(cfg: dict[str, Any], where: str = "model") -> ModelArgs:
    """ModelArgs from a model config mapping, checked by its kind (`ModelKind.check`)."""
    args = from_dict(ModelArgs, cfg, where)
    if args.kind not in KIND:
        raise not_allowed(f"{where}.kind", args.kind, KIND.names())
    KIND.get(args.kind).check(args, cfg, where)
    return args


def check_medm_args(args: ModelArgs, cfg: dict[str, Any], where: str) -> None:
    """The medm kind's config check: registered names, each component's keys, encoders with their connectors."""
    if args.qwenvl is not None:
        raise ConfigError(f"{where}.qwenvl: only for kind qwen-vl (kind is {args.kind!r})")
    for key, reg, name in (("llm.family", LLM, args.llm.family), ("template", TEMPLATE, args.template)):
        try:
            if name is not None:
                reg.get(name)
        except KeyError as e:
            raise ConfigError(f"{where}.{key}: {e.args[0]}") from None
    for slot, reg in (("vision", VISION), ("connector", CONNECTOR), ("vision3d", VISION), ("connector3d", CONNECTOR)):
        section = getattr(args, slot)
        if section is None:
            continue
        if not isinstance(section, dict) or "name" not in section:
            raise ConfigError(f"{where}.{slot}: needs a `name`; known: {', '.join(reg.names())}")
        try:
            cls = reg.get(section["name"])
        except KeyError as e:
            raise ConfigError(f"{where}.{slot}.name: {e.args[0]}") from None
        skip = _CONNECTOR_GEOMETRY if reg is CONNECTOR else {"self"}
        valid = ["name"] + [p for p in inspect.signature(cls.__init__).parameters if p not in skip]
        unknown = [k for k in section if k not in valid]
        if unknown:
            raise unknown_key(f"{where}.{slot}", unknown[0], valid, of=f" for {section['name']!r}")
        check_arguments(cls.__init__, {k: v for k, v in section.items() if k != "name"}, f"{where}.{slot}")
    for slot, pair in (("vision", "connector"), ("vision3d", "connector3d")):
        if (getattr(args, slot) is None) != (getattr(args, pair) is None):
            raise ConfigError(f"{where}: `{slot}` and `{pair}` come together: set both or neither")


def load_tokenizer(llm: LLMArgs) -> PreTrainedTokenizerBase:
    if llm.tiny_tokenizer is not None:
        return tiny_tokenizer(llm.tiny_tokenizer)
    source = llm.tokenizer or llm.path
    if not source:
        raise ConfigError("model.llm: set `tokenizer` or `path` (or `tiny_tokenizer` for an offline tiny one)")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=remote_code(llm.trust_remote_code, source,
                                                                               "tokenizer"))


def add_media_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add `<image>` / `<image3d>` as special tokens, and a pad token where the tokenizer has none."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, IMAGE3D_TOKEN]},
                                 replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _resolve_component(section: dict | None, reg) -> dict | None:
    if section is None:
        return None
    cls = reg.get(section["name"])
    resolved = cls.resolve_config(section) if hasattr(cls, "resolve_config") else dict(section)
    return {"name": section["name"], **{k: v for k, v in resolved.items() if k != "name"}}


def build_model(args: ModelArgs | dict[str, Any], quantization_config=None):
    """A model and tokenizer from a model config, built by its kind; pretrained parts load from their `path`s.

    For kind `qwen-vl` the pair is a Qwen-VL model (medm.qwenvl.model) and its processor, which stands where the
    tokenizer does (it saves with the checkpoint and holds the tokenizer as `.tokenizer`).

    Args:
        quantization_config: given to the pretrained LLM's `from_pretrained` (a QLoRA stage's `BitsAndBytesConfig`,
            medm.train._qlora); needs `llm.path` (or `qwenvl.path`): random weights are not loaded, so not quantized.
    """
    if isinstance(args, dict):
        args = parse_model_args(args)
    kind = KIND.get(args.kind)
    path, setting = kind.pretrained_path(args)
    if quantization_config is not None and path is None:
        raise ConfigError(f"stage.llm: qlora quantizes pretrained weights as they load, but {setting} is not set (a "
                          "random-init LLM from its config); use lora, or set the path")
    # A hub model that is not on disk fails here, naming its setting, when it cannot be downloaded.
    require_available(path, setting)
    return kind.build(args, quantization_config)


def build_medm(args: ModelArgs, quantization_config=None
               ) -> tuple[MedMForConditionalGeneration, PreTrainedTokenizerBase]:
    """`build_model` for the medm kind: encoder(s) + connector(s) + causal LM, and its tokenizer."""
    if args.llm.tiny_tokenizer is None and args.llm.tokenizer:
        require_available(args.llm.tokenizer, "model.llm.tokenizer", "tokenizer_config.json")
    for slot in ("vision", "vision3d"):  # encoders whose `path` is a transformers checkpoint
        section = getattr(args, slot)
        if section and section.get("path") and issubclass(VISION.get(section["name"]), HFEncoder):
            require_available(section["path"], f"model.{slot}.path")
    register_auto_classes()
    llm = args.llm
    tokenizer = load_tokenizer(llm)
    add_media_tokens(tokenizer)
    text_config = resolve_text_config(to_dict(llm))
    if llm.path is None:
        text_config.vocab_size = len(tokenizer)
    llm_settings = {"family": llm.family, "path": llm.path, "dtype": llm.dtype,
                    "attn_implementation": llm.attn_implementation, "trust_remote_code": llm.trust_remote_code,
                    "lora_target_modules": llm.lora_target_modules or LLM.get(llm.family).lora_target_modules}
    config = MedMConfig(
        text_config=text_config, llm=llm_settings,
        vision=_resolve_component(args.vision, VISION), connector=args.connector and dict(args.connector),
        vision3d=_resolve_component(args.vision3d, VISION), connector3d=args.connector3d and dict(args.connector3d),
        template=args.template or LLM.get(llm.family).template, system_prompt=args.system_prompt,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image3d_token_id=tokenizer.convert_tokens_to_ids(IMAGE3D_TOKEN),
    )
    # A pretrained LLM loads first and goes into the model as it is: no random LLM of its size is built before.
    pretrained = None if llm.path is None else load_llm(llm.path, text_config, llm.attn_implementation,
                                                        llm.trust_remote_code, quantization_config)
    model = MedMForConditionalGeneration(config, llm=pretrained)
    if llm.path is None:
        # A random-init LLM takes its special token ids from the tokenizer, as the Trainer would (with a warning).
        # Set after the build, as the Trainer does: a pad id in the config at build time gives the embedding a
        # padding_idx, whose init indexes a weight that ZeRO-3 has already partitioned away.
        configs = {id(c): c for c in (model.config.get_text_config(), model.llm.config, model.generation_config,
                                      getattr(model.llm, "generation_config", None)) if c is not None}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key) is not None:
                for c in configs.values():
                    setattr(c, key, getattr(tokenizer, key))
    for slot in ("vision", "vision3d"):
        section = getattr(args, slot)
        if section and section.get("path"):
            getattr(model, slot).load_pretrained(section["path"])
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # New rows start at the mean embedding, so added tokens do not dominate the first steps.
        model.llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        # (ZeRO-3 partitioned weights take their dtype from the DeepSpeed config instead.)
        model.to(resolve_dtype(llm.dtype))
    return model, tokenizer
