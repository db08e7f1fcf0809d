"""The jinja strings of medm's registered chat templates (registered in medm.data.templates), for tokenizers without
a chat template and for the prompts of checkpoints brought in by `medm import`."""

from __future__ import annotations

from medm.data.annotations import IMAGE3D_TOKEN, IMAGE_TOKEN

_LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")

# Phi-2 has no chat template; its model card's QA format is "Instruct: <prompt>\nOutput:".
PHI2 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Instruct: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Output: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Output:' }}{%- endif -%}"
)

# LLaVA v1 (conv_vicuna_v1): "{system} USER: {q} ASSISTANT: {a}</s>USER: ...". The generation prompt ends at
# "ASSISTANT:" and the answer carries its leading space, as in LLaVA, so prompt and answer tokenize apart.
VICUNA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + _LLAVA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ system + ' ' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Caption pretraining (LLaVA "plain"): the images' placeholders, then the caption and EOS; human text is dropped.
PRETRAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '" + IMAGE_TOKEN + "' * message['content'].count('" + IMAGE_TOKEN + "') }}"
    "{{ '" + IMAGE3D_TOKEN + "' * message['content'].count('" + IMAGE3D_TOKEN + "') }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

# MedM-VL (conv_version qwen2, lvlm/dataset/template at 193feb7 and 225fc0f; other LLMs the same text with their
# EOS): "{system} USER: {q} ASSISTANT: {a}<eos>USER: {q2} ASSISTANT: ..." -- no space after the EOS before a later
# turn's "USER:"; question and answer stripped as MedM-VL does; the image placeholder stays where the record put it.
MEDM_VL = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + _LLAVA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ system + ' ' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] | trim + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] | trim + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# TinyLLaVA_Factory (phi, qwen2_base, qwen2_instruct, llama, gemma templates; they differ only in the EOS, which is
# the tokenizer's here): "{system} USER: {q} ASSISTANT: {a}<eos>USER: ...". A question with an image is rewritten as
# TinyLLaVA does: every "<image>" removed, the text stripped, one "<image>\n" put in front, the result stripped.
TINYLLAVA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + _LLAVA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ system + ' ' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set content = message['content'] -%}"
    "{%- if '" + IMAGE_TOKEN + "' in content -%}"
    "{%- set content = ('" + IMAGE_TOKEN + "\\n' + content.replace('" + IMAGE_TOKEN + "', '').strip()).strip() -%}"
    "{%- endif -%}{{ 'USER: ' + content + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Original LLaVA (haotian-liu/LLaVA llava/conversation.py, also LLaVA-Med's): conv_llava_v1 and conv_vicuna_v1
# (SeparatorStyle.TWO; they differ in the default system text only) and conv_mistral_instruct (SeparatorStyle.LLAMA_2
# with no system text). The end of an answer is the literal "</s>" LLaVA writes, whatever the tokenizer's EOS.
# LLaVA-Med's copy of the TWO style writes "</s> " (a space) between turns; single-question prompts are equal.
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions.")


def _llava_two(system: str) -> str:
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system = '" + system.replace("'", "\\'") + "' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
        "{{ system + ' ' }}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


# "[INST] q [/INST] a </s>[INST] q2 [/INST]"; a system text goes in front of the first question in <<SYS>> tags.
MISTRAL_INSTRUCT = (
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] -%}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- set ns = namespace(first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system if ns.first else '') + message['content'] + ' [/INST]' }}{%- set ns.first = false -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + ' </s>' }}"
    "{%- endif -%}{%- endfor -%}"
)
