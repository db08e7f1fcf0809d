"""Model kinds: `ModelKind`, what medm asks of one, and the `medm` kind (vision encoder -> connector -> causal LM).

A kind is registered in `KIND` under the name `model.kind` holds in the YAML (`medm list` shows them); the other
kind is `qwen-vl` (medm.qwenvl.kind). Everything that differs between kinds goes through these hooks, so no other
module branches on a kind's name. A model says its kind with its `medm_kind` class attribute.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer

from medm.data.dataset import build_conversation_dataset
from medm.infer.generate import Predictor
from medm.models import builder, checkpoint
from medm.models.tiny import tiny_medm_overrides
from medm.registry import KIND


class ModelKind:
    """The hooks of one model kind; subclasses override them all (class-level, never instantiated)."""

    # True when the model renders records with its own processor (images are not prepared by medm's encoders).
    own_processor: bool = False

    @staticmethod
    def check(args, cfg: dict[str, Any], where: str) -> None:
        """Raise ConfigError for a model config (`args`: ModelArgs parsed from `cfg`) this kind cannot build."""
        raise NotImplementedError

    @staticmethod
    def pretrained_path(args) -> tuple[str | None, str]:
        """(path of the pretrained language model or None for random init, the setting that names it)."""
        raise NotImplementedError

    @staticmethod
    def build(args, quantization_config=None):
        """(model, tokenizer or processor) from ModelArgs."""
        raise NotImplementedError

    @staticmethod
    def owns(path: str) -> bool:
        """True when checkpoint directory `path` holds a model of this kind."""
        raise NotImplementedError

    @staticmethod
    def load(path: str, dtype: str | None = None, device: str | torch.device | None = None,
             trust_remote_code: bool = False):
        """(model, tokenizer or processor) of a full checkpoint of this kind."""
        raise NotImplementedError

    @staticmethod
    def load_processing(path: str, trust_remote_code: bool = False):
        """The tokenizer or processor saved in a checkpoint directory."""
        raise NotImplementedError

    @staticmethod
    def full_state(path: str) -> dict[str, torch.Tensor]:
        """A full checkpoint's weights under the model's parameter names (`stage.init_from`)."""
        raise NotImplementedError

    @staticmethod
    def build_dataset(data_args, model, tokenizer):
        """The training / evaluation dataset of `data_args` (medm.data.DataArgs) for `model`."""
        raise NotImplementedError

    @staticmethod
    def predictor() -> type:
        """medm.infer's Predictor (or its subclass) that answers records with this kind's models."""
        raise NotImplementedError

    @staticmethod
    def tiny_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
        """A model config mapping turned into its tiny offline twin of the same shape (tests, `--tiny`)."""
        raise NotImplementedError

    @staticmethod
    def llm_settings(args) -> tuple[str, str]:
        """(weights dtype, attention implementation) of the language model (`medm estimate`)."""
        raise NotImplementedError

    # `medm estimate`: `(args, needs_files) -> args` whose pretrained parts are described by their configs (paths
    # dropped, so nothing loads); None: estimate reads the medm kind's components itself.
    estimate_offline_args = None


@KIND.register("medm")
class MedMKind(ModelKind):
    """Vision encoder(s) -> connector(s) -> any HF causal LM, assembled from the YAML's sections (medm.models)."""

    check = staticmethod(builder.check_medm_args)
    build = staticmethod(builder.build_medm)
    load = staticmethod(checkpoint.load_medm)
    full_state = staticmethod(checkpoint.load_full_state)
    build_dataset = staticmethod(build_conversation_dataset)
    tiny_overrides = staticmethod(tiny_medm_overrides)

    @staticmethod
    def pretrained_path(args) -> tuple[str | None, str]:
        return args.llm.path, "model.llm.path"

    @staticmethod
    def owns(path: str) -> bool:
        return False  # the default kind: a checkpoint no other kind claims

    @staticmethod
    def load_processing(path: str, trust_remote_code: bool = False):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    @staticmethod
    def predictor() -> type:
        return Predictor

    @staticmethod
    def llm_settings(args) -> tuple[str, str]:
        return args.llm.dtype, args.llm.attn_implementation
