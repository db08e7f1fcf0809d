"""What transformers' LLaVA format and medm share, for the exporter (`medm.interop.llava_hf`) and the importer
(`medm.interop._llava_hf_import`): the weight renames, chat-template wrapping, settings tables and errors."""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from medm.data.annotations import IMAGE_TOKEN

# medm resample names <-> PIL resampling codes (what transformers' image processors store).
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# medm MLP activations (medm.models.connectors._mlp) <-> transformers ACT2FN names computing the same function.
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}
MODEL_YAML = "model.yaml"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Prefix renames medm -> LLaVA; `{llm}` is the LLM's `base_model_prefix`.
_VISION = ("vision.model.", "model.vision_tower.")
_PROJ_1 = ("connector.mlp.0.", "model.multi_modal_projector.linear_1.")
_PROJ_2 = ("connector.mlp.2.", "model.multi_modal_projector.linear_2.")
_LM_HEAD = ("llm.lm_head.", "lm_head.")
_LANGUAGE_MODEL = "model.language_model."



class ExportError(ValueError):
    """A medm model part that transformers' LLaVA format cannot hold; the message says which part and why."""


class ImportFormatError(ValueError):
    """A transformers checkpoint that medm cannot open as a medm model; the message says which setting and why."""


# ---- chat templates -------------------------------------------------------------------------------------------
_EXPORT_BEGIN = "{#- medm export: contents may be strings or lists of {type: image | text} parts -#}\n"
_EXPORT_END = "{#- medm export: the model's own template follows -#}\n"
# Turns list contents (what `processor.apply_chat_template` users write) into medm's strings: an image part is
# "<image>\n", as in LLaVA records; then adds the model's default system prompt where the chat has none.
_EXPORT_BODY = """\
{%- set _medm = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string or _m['content'] is none -%}{%- set _c = _m['content'] -%}
{%- else -%}{%- set _t = namespace(text='') -%}
{%- for _p in _m['content'] -%}
{%- if _p['type'] == 'image' -%}{%- set _t.text = _t.text + IMAGE_PART -%}
{%- elif _p['type'] == 'text' -%}{%- set _t.text = _t.text + _p['text'] -%}{%- endif -%}
{%- endfor -%}{%- set _c = _t.text -%}
{%- endif -%}
{%- set _medm.messages = _medm.messages + [{'role': _m['role'], 'content': _c}] -%}
{%- endfor -%}
{%- if _medm_system is not none and (not _medm.messages or _medm.messages[0]['role'] != 'system') -%}
{%- set _medm.messages = [{'role': 'system', 'content': _medm_system}] + _medm.messages -%}
{%- endif -%}
{%- set messages = _medm.messages -%}
"""
_SYSTEM_LINE = re.compile(r"\{%- set _medm_system = (.*) -%\}\n")

# The reverse, for templates that read only list contents (llava-hf's own): a medm string "<image>\nq" becomes
# [{type: image}, {type: text, text: q}] (one newline after an image belongs to the placeholder, as above).
_LIST_ADAPTER = """\
{#- medm import: string contents become lists of {type: image | text} parts -#}
{%- set _medm = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string -%}{%- set _t = namespace(items=[]) -%}
{%- for _s in _m['content'].split(IMAGE) -%}
{%- if not loop.first -%}{%- set _t.items = _t.items + [{'type': 'image'}] -%}{%- endif -%}
{%- set _s = _s[1:] if (not loop.first and _s.startswith('\\n')) else _s -%}
{%- if _s -%}{%- set _t.items = _t.items + [{'type': 'text', 'text': _s}] -%}{%- endif -%}
{%- endfor -%}
{%- set _medm.messages = _medm.messages + [{'role': _m['role'], 'content': _t.items}] -%}
{%- else -%}{%- set _medm.messages = _medm.messages + [_m] -%}{%- endif -%}
{%- endfor -%}
{%- set messages = _medm.messages -%}
"""


def _jinja_str(value: str | None) -> str:
    # JSON string escapes are a subset of what jinja string literals accept.
    return "none" if value is None else json.dumps(value)


def export_chat_template(jinja: str, system_prompt: str | None) -> str:
    """The model's chat template, taking string or list contents and adding its default system prompt.

    Idempotent: a template this function wrote is unwrapped first, so export -> import -> export does not nest.
    """
    jinja, _ = split_export_template(jinja)
    return (_EXPORT_BEGIN + "{%- set _medm_system = " + _jinja_str(system_prompt) + " -%}\n"
            + _EXPORT_BODY.replace("IMAGE_PART", _jinja_str(IMAGE_TOKEN + "\n")) + _EXPORT_END + jinja)


def split_export_template(jinja: str) -> tuple[str, str | None]:
    """(the model's own template, its default system prompt) from an `export_chat_template` result; other
    templates come back unchanged with None."""
    if not jinja.startswith(_EXPORT_BEGIN) or _EXPORT_END not in jinja:
        return jinja, None
    head, own = jinja.split(_EXPORT_END, 1)
    m = _SYSTEM_LINE.search(head)
    system = json.loads(m.group(1)) if m and m.group(1) != "none" else None
    return own, system


def list_content_adapter(jinja: str) -> str:
    """Wrap a template that reads only list contents so it renders medm's string contents."""
    return _LIST_ADAPTER.replace("IMAGE", _jinja_str(IMAGE_TOKEN)) + jinja


# ---- weights ---------------------------------------------------------------------------------------------------------
def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], what: str,
            error: type[ValueError]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for src, dst in rules:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise error(f"{what}: weight {k!r} has no place in the other format")
    return out


def _on_meta(build):
    """Build a module with parameters on the meta device: no random init, no memory until weights are assigned."""
    with torch.device("meta"):
        return build()


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{what}: missing weights {missing[:3]}, unexpected {unexpected[:3]}")
