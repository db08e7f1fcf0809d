"""QLoRA wiring on the CPU: the BitsAndBytesConfig reaches the LLM's from_pretrained, the vision parts and the head
stay in full precision, prepare_model_for_kbit_training runs before the adapters, and a machine without CUDA or
bitsandbytes gets a clear error. (The 4-bit run itself is scripts/gpu_check.sh's.)"""

from pathlib import Path

import pytest
import torch
from train_helpers import make_cfg, write_bright_dark
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.quantizers.quantizers_utils import should_convert_module

import medm.train._qlora as qlora
from medm.config import ConfigError, load_yaml
from medm.models import build_model
from medm.models.tiny import tiny_model_config
from medm.qwenvl.model import Qwen2_5_VLForConditionalGeneration, quantization_skip
from medm.train.args import StagePlan
from medm.train.stages import apply_plan, trainable_parameter_names
from medm.train.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend CUDA and bitsandbytes are there (only the configuration is checked, nothing is quantized)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qlora, "_bitsandbytes_installed", lambda: True)


def _capture(monkeypatch, cls, attr="from_pretrained"):
    """Record the kwargs of `cls.from_pretrained` and load without the (GPU-only) quantization."""
    seen = {}
    real = getattr(cls, attr).__func__

    def fake(klass, *args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config", None)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, attr, classmethod(fake))
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_a_cpu_machine_is_a_clear_error_before_anything_loads(tmp_path):
    cfg = make_cfg(tmp_path / "run", write_bright_dark(tmp_path), {"llm": "qlora"})
    with pytest.raises(ConfigError, match="qlora loads the LLM in 4 bits with bitsandbytes, which needs a CUDA GPU"):
        run_training(cfg)


def test_qlora_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qlora, "_bitsandbytes_installed", lambda: False)
    with pytest.raises(ConfigError, match="qlora needs the bitsandbytes package"):
        qlora.qlora_load_config(torch.bfloat16)


def test_medm_llm_loads_with_the_nf4_config_and_the_rest_stays_full_precision(tmp_path, monkeypatch, gpu_machine):
    cfg = tiny_model_config()
    torch.manual_seed(0)
    llm_dir = tmp_path / "llm"
    AutoModelForCausalLM.from_config(build_model(cfg)[0].config.text_config).save_pretrained(llm_dir)
    cfg["llm"] = {**cfg["llm"], "path": str(llm_dir), "config": None}
    seen = _capture(monkeypatch, AutoModelForCausalLM)
    quant = qlora.qlora_load_config(torch.bfloat16)
    model, _ = build_model(cfg, quantization_config=quant)
    got = seen["quantization_config"]
    assert isinstance(got, BitsAndBytesConfig) and got.load_in_4bit and got.bnb_4bit_quant_type == "nf4"
    assert got.bnb_4bit_compute_dtype == torch.bfloat16 and got.bnb_4bit_use_double_quant
    # transformers' default skip list (None) keeps the output head in full precision.
    assert got.llm_int8_skip_modules is None
    # What the 4-bit load leaves the stage plan: peft's preparation, then LoRA on the LLM, the connector trained.
    model.llm.is_loaded_in_4bit = True
    model.to(torch.bfloat16)
    peft = apply_plan(model, StagePlan(llm="qlora", connector="full"))
    names = trainable_parameter_names(peft)
    assert any("lora_A" in n for n in names) and any("connector" in n and "modules_to_save" in n for n in names)
    assert not any(n.startswith("base_model.model.vision.") for n in names)
    # prepare_model_for_kbit_training put the non-quantized weights (towers, norms) back in float32.
    base = peft.get_base_model()
    assert {p.dtype for p in base.vision.parameters()} == {torch.float32}
    assert base.llm.model.norm.weight.dtype == torch.float32


def test_qlora_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="model.llm.path is not set"):
        build_model(tiny_model_config(), quantization_config=object())


def test_qwenvl_quantizes_only_the_language_model(tmp_path, monkeypatch, gpu_machine):
    cfg = load_yaml(str(REPO / "configs" / "model" / "tiny-qwen2.5-vl.yaml"))
    torch.manual_seed(0)
    model, processor = build_model(cfg)
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    cfg["qwenvl"] = {k: v for k, v in cfg["qwenvl"].items() if k not in ("config", "tiny_processor")}
    cfg["qwenvl"]["path"] = str(tmp_path / "qwen")
    seen = _capture(monkeypatch, Qwen2_5_VLForConditionalGeneration)
    build_model(cfg, quantization_config=qlora.qlora_load_config(torch.bfloat16))
    skip = seen["quantization_config"].llm_int8_skip_modules
    assert skip == quantization_skip(Qwen2_5_VLForConditionalGeneration)
    # transformers' own matching of module names against the skip list: the LLM's linears are converted, the
    # tower, the merger and the head are not.
    for name in ("model.language_model.layers.0.mlp.up_proj", "model.language_model.layers.1.self_attn.q_proj"):
        assert should_convert_module(name, skip), name
    for name in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "model.visual.patch_embed.proj",
                 "lm_head"):
        assert not should_convert_module(name, skip), name
