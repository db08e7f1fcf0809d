"""Registry, config parsing and every shipped model YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medm.config import ConfigError, apply_overrides, load_yaml
from medm.models import build_model, parse_model_args
from medm.models.llm import check_attn_implementation
from medm.models.tiny import tiny_model_config, tiny_overrides
from medm.registry import CONNECTOR, VISION, Registry

MODEL_YAMLS = sorted((Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))


def test_unknown_component_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown vision encoder 'nope'; known: .*clip"):
        VISION.get("nope")
    with pytest.raises(ConfigError, match=r"model.connector.name: unknown connector 'nope'; known: .*mlp"):
        parse_model_args(tiny_model_config(connector={"name": "nope"}))


def test_registry_rejects_double_registration():
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(float)


@pytest.mark.parametrize("section,key",
                         [("", "visoin"), ("llm.", "pth"), ("connector.", "depth"), ("vision.", "layers")])
def test_unknown_config_key_is_named(section, key):
    cfg = tiny_model_config()
    node = cfg
    for part in filter(None, section.rstrip(".").split(".")):
        node = node[part]
    node[key] = 1
    with pytest.raises(ConfigError, match=rf"\.{key}: unknown key( for '\w+')?; (did you mean \w+\?|valid keys: )"):
        parse_model_args(cfg)


def test_dotted_overrides_parse_yaml_values():
    cfg = apply_overrides({"llm": {"path": "a"}}, ["llm.path=/models/x", "llm.dtype=bfloat16", "vision.select_layer=-1",
                                                   "connector=null"])
    assert cfg == {"llm": {"path": "/models/x", "dtype": "bfloat16"}, "vision": {"select_layer": -1}, "connector": None}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["llm.path"])


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm:\n  family: qwen2\n  config: {a: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+"):
        load_yaml(str(bad))


def test_vision_without_connector_is_rejected():
    cfg = tiny_model_config()
    del cfg["connector"]
    with pytest.raises(ConfigError, match="`vision` and `connector` come together"):
        parse_model_args(cfg)


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=[p.stem for p in MODEL_YAMLS])
def test_every_model_yaml_builds_with_tiny_overrides(path):
    cfg = load_yaml(str(path))
    args = parse_model_args(cfg, where=path.name)  # the real file validates as written
    tiny = tiny_overrides(cfg)
    model, tok = build_model(tiny)
    if args.kind == "qwen-vl":  # a Qwen-VL model and its processor; run end to end in tests/qwenvl
        assert model.config.model_type == tiny["qwenvl"]["config"]["model_type"]
        assert model.config.medm["box_format"] == args.qwenvl.box_format
        return
    assert model.config.llm["family"] == args.llm.family
    if args.vision:
        assert model.config.vision["name"] == args.vision["name"]
        assert model.config.connector["name"] == args.connector["name"]
        ids = tok("<image>" * model.num_image_tokens + "Is there a lesion?", return_tensors="pt").input_ids
        size = model.config.vision["config"].get("image_size", 32) if "config" in model.config.vision else 32
        px = torch.randn(1, 3, size, size)
        out = model(input_ids=ids, pixel_values=px, labels=ids)
    else:
        ids = tok("Is there a lesion?", return_tensors="pt").input_ids
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_flash_attention_needs_its_package():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash-attn"):
            check_attn_implementation("flash_attention_2")
    else:
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA"):
                check_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="unknown attn_implementation 'fast'"):
        check_attn_implementation("fast")


def test_medm_list_prints_every_registry():
    out = subprocess.run([sys.executable, "-m", "medm.cli", "list"], capture_output=True, text=True, check=True).stdout
    for name in ["clip", "mlp", "qwen2", "phi3"]:
        assert name in out
    assert CONNECTOR.names() and all(n in out for n in CONNECTOR.names())
