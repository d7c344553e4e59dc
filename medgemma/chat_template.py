"""Gemma 3's chat format as a Jinja template, for checkpoints that ship without one (and for the demo builder).

Gemma 3 turn format: ``<bos>``; each turn ``<start_of_turn>{role}\n…<end_of_turn>\n`` with the assistant's role
written ``model``; a system message is not a turn (its text and a blank line open the first user turn); an image part
becomes ``<start_of_image>``, which the processor expands; roles alternate user/model; the generation prompt is
``<start_of_turn>model\n``. Serving code reads it from here, so it never imports the demo-checkpoint builder.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content | trim }}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- else -%}{{ raise_exception('Unsupported content part type: ' + part['type'] | string) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif content is none -%}"
    "{%- else -%}{{ raise_exception('Message content must be a string or a list of parts') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{ '<bos>' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = render(messages[0]['content']) + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'model' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if role != expected -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... "
    "after an optional system message') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ render(message['content']) }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
