"""The `qwen-vl` model kind: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model and its processor, configured in `qwenvl`.

The model classes (medm.qwenvl.model) load on first use: importing them imports transformers' Qwen-VL modeling
modules, which `medm list` and a medm-kind run never need.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

from medm.config import ConfigError
from medm.models.kind import ModelKind
from medm.qwenvl.args import NAME, is_qwenvl_checkpoint
from medm.qwenvl.data import build_qwenvl_dataset
from medm.qwenvl.infer import QwenVLPredictor
from medm.qwenvl.model import build_qwenvl, load_qwenvl, load_qwenvl_processor
from medm.qwenvl.tiny import tiny_qwenvl_overrides
from medm.registry import KIND

# What a qwen-vl model config must not hold: the model brings its own tower, merger, LLM and chat template.
_MEDM_SECTIONS = ("llm", "vision", "connector", "vision3d", "connector3d", "template")


@KIND.register(NAME)
class QwenVLKind(ModelKind):
    """transformers' own Qwen-VL classes plus medm's mixin; records are rendered with the model's processor."""

    own_processor = True

    @staticmethod
    def check(args, cfg: dict[str, Any], where: str) -> None:
        other = [k for k in _MEDM_SECTIONS if cfg.get(k) is not None]
        if other or args.qwenvl is None:
            raise ConfigError(f"{where}: kind qwen-vl is configured in the `qwenvl` section only" +
                              (f"; remove `{other[0]}`" if other else "; add it"))
        args.qwenvl.check(f"{where}.qwenvl")

    @staticmethod
    def pretrained_path(args) -> tuple[str | None, str]:
        return getattr(args.qwenvl, "path", None), "model.qwenvl.path"

    @staticmethod
    def build(args, quantization_config=None):
        return build_qwenvl(args.qwenvl, args.system_prompt, quantization_config=quantization_config)

    owns = staticmethod(is_qwenvl_checkpoint)

    @staticmethod
    def load(path: str, dtype: str | None = None, device: str | torch.device | None = None,
             trust_remote_code: bool = False):
        return load_qwenvl(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    @staticmethod
    def load_processing(path: str, trust_remote_code: bool = False):
        return load_qwenvl_processor(path, trust_remote_code)

    @staticmethod
    def full_state(path: str) -> dict[str, torch.Tensor]:
        # transformers saves Qwen-VL weights under their original (pre-v5) names; its loader maps them back.
        return QwenVLKind.load(path)[0].state_dict()

    @staticmethod
    def build_dataset(data_args, model, tokenizer):
        return build_qwenvl_dataset(data_args, model, tokenizer)

    @staticmethod
    def predictor() -> type:
        return QwenVLPredictor

    @staticmethod
    def tiny_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
        # A train config's model section carries the medm kind's default `llm`; this kind has none.
        return tiny_qwenvl_overrides({k: v for k, v in model_cfg.items() if k != "llm"})

    @staticmethod
    def llm_settings(args) -> tuple[str, str]:
        return args.qwenvl.dtype, args.qwenvl.attn_implementation

    @staticmethod
    def estimate_offline_args(args, needs_files):
        q = args.qwenvl
        if q.path is not None:
            hf = needs_files(lambda: AutoConfig.from_pretrained(q.path, trust_remote_code=q.trust_remote_code),
                             "model.qwenvl.path", q.path)
            q.config = {"model_type": hf.model_type, **hf.to_diff_dict()}
            q.processor = q.processor or q.path
            q.path = None
        return args
