"""Offline tiny presets: encoder and LLM configs with random weights, and a tokenizer trained in-process.

Everything here builds without a download; tests and the demo use it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medm.models._chat_templates import CHAT_TEMPLATES
from medm.registry import CONNECTOR, DEFAULT_KIND, KIND, VISION

# Special tokens of the three chat formats, so one tiny tokenizer can carry any of their templates.
_SPECIALS = {
    "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
    "llama3": {"eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>", "bos_token": "<|begin_of_text|>"},
    "phi3": {"eos_token": "<|end|>", "pad_token": "<|endoftext|>", "bos_token": None},
    "none": {"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"},
}
_ALL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<s>", "</s>", "<pad>",
]

MEDICAL_TEXT = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. You are a helpful medical imaging assistant.
USER: ASSISTANT: Human: Assistant: system user assistant
Is there a lesion in this scan? Yes. No. There is one lesion. There are two lesions. There is no lesion.
Where is the lesion? The lesion is in the upper left. upper right, lower left, lower right, center.
How many lesions are there? zero one two three four five 0 1 2 3 4 5 6 7 8 9 10
How large is the lesion? small, medium, large. The largest lesion is large.
Describe the image. A grayscale scan with an organ outline and a bright round lesion.
The chest radiograph shows clear lungs with no focal consolidation, pleural effusion or pneumothorax.
The cardiomediastinal silhouette is within normal limits. Axial CT of the abdomen with contrast.
MRI of the brain shows a hyperintense lesion in the left frontal lobe on T2-weighted images.
Is this an MRI or a CT? CT. Which organ is shown? brain, chest, lung, liver, kidney, heart, abdomen, spine.
Is the heart enlarged? Is there a fracture? Is there pneumonia? normal, abnormal, benign, malignant.
What modality is used? X-ray, ultrasound, computed tomography, magnetic resonance imaging.
left right both neither anterior posterior superior inferior medial lateral bilateral mass nodule
opacity effusion edema hemorrhage infarct tumor cyst calcification atelectasis cardiomegaly
"""

TINY_LLM: dict[str, dict[str, Any]] = {
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
              "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
              "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "phi3": {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1024,
             "max_position_embeddings": 2048, "pad_token_id": 0, "tie_word_embeddings": False},
    "phi": {"model_type": "phi", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 1024, "max_position_embeddings": 2048,
            "tie_word_embeddings": False},
}

# Which tiny chat format matches each LLM family's real tokenizer.
TINY_TEMPLATE_FOR_FAMILY = {"qwen2": "chatml", "llama": "llama3", "phi3": "phi3", "phi": "none", "auto": "chatml"}


def tiny_tokenizer(chat_template: str = "chatml", vocab_size: int = 1024, extra_text: str = "",
                   extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained now on `MEDICAL_TEXT` (+ `extra_text`).

    Args:
        chat_template: `chatml` (Qwen2.5), `llama3`, `phi3`, or `none` (no template: a registered medm
            template must render prompts).
        extra_special_tokens: more special tokens, each one id, after the chat formats' own (e.g. Qwen-VL's
            `<|image_pad|>`, `<|box_start|>`; see `medm.qwenvl.tiny`).
    """
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown tiny chat template {chat_template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = _ALL_SPECIALS + [t for t in extra_special_tokens if t not in _ALL_SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = MEDICAL_TEXT + extra_text
    tok.train_from_iterator([line for line in text.splitlines() if line.strip()], trainer)
    specials = {k: v for k, v in _SPECIALS[chat_template].items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATES[chat_template],
                                   clean_up_tokenization_spaces=False, **specials)


def tiny_vision(name: str, section: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tiny settings for a registered encoder (merged over its config section): its class's `tiny()`, in its own file.

    Args:
        section: the config section being replaced, for settings the twin keeps (the `hf` encoder's `model_type`).
    """
    try:
        return copy.deepcopy(VISION.get(name).tiny(section))
    except NotImplementedError as e:
        raise KeyError(str(e)) from None


def tiny_connector(name: str) -> dict[str, Any]:
    """Small settings (merged over `{"name": ...}`) of a registered connector: its class's `tiny()`."""
    try:
        return copy.deepcopy(CONNECTOR.get(name).tiny())
    except NotImplementedError as e:
        raise KeyError(str(e)) from None


def __getattr__(name: str) -> Any:
    # The former central tables, now gathered from each component's own `tiny()` when asked for.
    if name == "TINY_VISION":
        return {n: tiny_vision(n) for n in VISION.names() if n != "hf"}
    if name == "TINY_CONNECTOR":
        return {n: tiny_connector(n) for n in CONNECTOR.names()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_llm(family: str) -> dict[str, Any]:
    """A tiny HF config dict (with `model_type`) for an LLM family."""
    if family not in TINY_LLM:
        raise KeyError(f"no tiny preset for LLM family {family!r}; have: {', '.join(TINY_LLM)}")
    return copy.deepcopy(TINY_LLM[family])


def tiny_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Turn any model config (e.g. a real 3B preset) into its tiny, offline twin of the same shape.

    Paths are dropped, each component gets its tiny architecture, and the tokenizer is trained in-process
    with the chat format of the LLM family. Component names, connector types and selections are kept. The model's
    kind makes the twin (`ModelKind.tiny_overrides`).
    """
    return KIND.get(model_cfg.get("kind") or DEFAULT_KIND).tiny_overrides(model_cfg)


def tiny_medm_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """`tiny_overrides` for the medm kind: tiny LLM of the family, tiny encoders, in-process tokenizer."""
    cfg = copy.deepcopy(model_cfg)
    llm = cfg.setdefault("llm", {})
    family = llm.get("family", "auto")
    llm.update(path=None, tokenizer=None, config=tiny_llm(family if family in TINY_LLM else "qwen2"),
               tiny_tokenizer=TINY_TEMPLATE_FOR_FAMILY.get(family, "chatml"), dtype="float32",
               attn_implementation="sdpa")
    for slot in ("vision", "vision3d"):
        if cfg.get(slot):
            section = cfg[slot]
            cfg[slot] = {k: v for k, v in section.items() if k not in ("path", "config")}
            cfg[slot].update(tiny_vision(section["name"], section))
    return cfg


def tiny_model_config(vision: str | None = "clip", connector: dict[str, Any] | None = None, family: str = "qwen2",
                      template: str | None = None) -> dict[str, Any]:
    """A model config dict for the tiny offline preset of the given parts (what tests and the demo build)."""
    cfg: dict[str, Any] = {
        "llm": {"family": family, "config": tiny_llm(family), "tiny_tokenizer": TINY_TEMPLATE_FOR_FAMILY[family]},
        "template": template,
    }
    if vision is not None:
        cfg["vision"] = {"name": vision, **tiny_vision(vision)}
        cfg["connector"] = connector or {"name": "mlp", "type": "mlp2x_gelu"}
    return cfg
