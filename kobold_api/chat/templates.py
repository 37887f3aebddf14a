"""Instruct/chat templates: how a list of role-tagged messages becomes prompt text.

Every template, whether the model's own Hugging Face ``chat_template`` or one of the
named built-ins, is rendered the same way (a sandboxed Jinja environment), and the
things the prompt builder needs beyond plain rendering (stop strings, the text that
opens the assistant's turn, an unfinished turn for "continue") are *derived* by
rendering sentinel messages. That way no per-template tables have to be kept in sync
with the templates themselves, and any model's template works out of the box.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "JinjaChatTemplate",
    "NAMED_TEMPLATE_NAMES",
    "get_named_template",
    "template_for_model",
    "render_open_turn",
]

Message = dict[str, Any]

# Sentinels are plain ASCII words so that templates which trim or otherwise touch
# message content still leave them findable.
_USER_SENTINEL_1 = "KOBOLDSENTINELUSERONE"
_ASSISTANT_SENTINEL = "KOBOLDSENTINELASSISTANT"
_USER_SENTINEL_2 = "KOBOLDSENTINELUSERTWO"
_SYSTEM_SENTINEL = "KOBOLDSENTINELSYSTEM"
_OPEN_TURN_SENTINEL = "KOBOLDSENTINELOPENTURN"


#: Names a client's template variables may not take: what every render passes, and our functions.
_RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools",
                                 "raise_exception", "strftime_now"})


class ChatTemplateError(ValueError):
    """A template could not be compiled or refused the messages (``raise_exception``)."""


@runtime_checkable
class ChatTemplate(Protocol):
    """Anything that can turn system/user/assistant messages into prompt text."""

    def render(self, messages: list[Message], add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None, variables: dict[str, Any] | None = None) -> str:
        """Render ``messages``; ``add_generation_prompt`` opens an assistant turn at the end;
        ``tools``: OpenAI function definitions, for a template that lays them out; ``variables``:
        more the template may read (``enable_thinking``, ``reasoning_effort``: a client's
        ``chat_template_kwargs``)."""
        ...

    @property
    def stop_strings(self) -> list[str]:
        """Turn markers meaning "the assistant's turn ended" or "a user turn begins"."""
        ...

    @property
    def assistant_prefix(self) -> str:
        """What ``add_generation_prompt`` appends: the opening of an assistant turn."""
        ...


def render_open_turn(template: ChatTemplate, messages: list[Message], role: str, partial_text: str) -> str:
    """Render ``messages`` plus an unfinished ``role`` turn that ends exactly at ``partial_text``.

    Used for "continue" and for chat-instruct's ``{char}:`` tail: the end-of-turn suffix
    the template would add after the last message is cut off, so generated text is
    appended to ``partial_text``. The turn is rendered with a sentinel and the sentinel
    replaced afterwards, so templates that trim content cannot eat the partial text's
    trailing characters.
    """
    rendered = template.render([*messages, {"role": role, "content": _OPEN_TURN_SENTINEL}], False)
    cut = rendered.rfind(_OPEN_TURN_SENTINEL)
    if cut < 0:
        raise ChatTemplateError(f"the chat template does not render the content of a {role!r} message")
    return rendered[:cut] + partial_text


class _DerivedMarkers:
    """Derives stop strings and the assistant prefix of any template from its own output."""

    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[Message], add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None,
               variables: dict[str, Any] | None = None) -> str:  # pragma: no cover
        raise NotImplementedError

    @cached_property
    def _turn_markers(self) -> tuple[str, str]:
        """(assistant end-of-turn suffix, user turn prefix), or empty strings if underivable.

        Tried without and then with a system message, since some templates insist on one.
        """
        user_1 = {"role": "user", "content": _USER_SENTINEL_1}
        assistant = {"role": "assistant", "content": _ASSISTANT_SENTINEL}
        user_2 = {"role": "user", "content": _USER_SENTINEL_2}
        for lead in ([], [{"role": "system", "content": _SYSTEM_SENTINEL}]):
            try:
                one_turn = self.render([*lead, user_1, assistant], False)
                two_turns = self.render([*lead, user_1, assistant, user_2], False)
            except ChatTemplateError:
                continue
            after_assistant = one_turn.rfind(_ASSISTANT_SENTINEL)
            between_start = two_turns.rfind(_ASSISTANT_SENTINEL)
            between_end = two_turns.rfind(_USER_SENTINEL_2)
            if after_assistant < 0 or between_start < 0 or between_end < between_start:
                continue
            suffix = one_turn[after_assistant + len(_ASSISTANT_SENTINEL):]
            between = two_turns[between_start + len(_ASSISTANT_SENTINEL):between_end]
            user_prefix = between[len(suffix):] if between.startswith(suffix) else between
            return suffix, user_prefix
        return "", ""

    @cached_property
    def assistant_prefix(self) -> str:
        """The text ``add_generation_prompt`` adds after a user turn ("" if underivable)."""
        user = {"role": "user", "content": _USER_SENTINEL_1}
        for lead in ([], [{"role": "system", "content": _SYSTEM_SENTINEL}]):
            try:
                without = self.render([*lead, user], False)
                with_prompt = self.render([*lead, user], True)
            except ChatTemplateError:
                continue
            if with_prompt.startswith(without):
                return with_prompt[len(without):]
        return ""

    @cached_property
    def stop_strings(self) -> list[str]:
        """End-of-assistant-turn and start-of-user-turn markers, whitespace-trimmed.

        Each marker is also offered without the BOS/EOS token text: decoders usually skip
        special tokens, so ``"<s>[INST]"`` is only ever seen as ``"[INST]"``.
        """
        found: list[str] = []
        for marker in self._turn_markers:
            candidates = [marker.strip()]
            without_special = marker
            for special in (self.bos_token, self.eos_token):
                if special:
                    without_special = without_special.replace(special, "")
            candidates.append(without_special.strip())
            for candidate in candidates:
                if candidate and candidate not in found:
                    found.append(candidate)
        return found


def _raise_exception(message: str) -> None:
    """Exposed to templates as ``raise_exception``, like Hugging Face does."""
    raise TemplateError(message)


def _strftime_now(format_string: str) -> str:
    """Exposed to templates as ``strftime_now`` (some recent HF templates print the date)."""
    return datetime.now().strftime(format_string)


def _tojson(value: Any, indent: int | None = None) -> str:
    """HF's ``tojson``: plain JSON without Jinja's HTML escaping, which would corrupt prompts."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


class JinjaChatTemplate(_DerivedMarkers):
    """A Hugging Face tokenizer ``chat_template`` (Jinja) so a model gets its own format.

    ``bos_token``/``eos_token`` are the strings the template may reference. Pass an
    empty ``bos_token`` when the tokenizer adds BOS itself while encoding, to avoid two.
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", name: str = "") -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        environment.filters["tojson"] = _tojson
        try:
            self._compiled = environment.from_string(template)
        except TemplateError as error:
            raise ChatTemplateError(f"invalid chat template: {error}") from error

    @property
    def renders_tools(self) -> bool:
        """Whether the template lays out ``tools`` (OpenAI function definitions) itself."""
        return "tools" in self.source

    def render(self, messages: list[Message], add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None, variables: dict[str, Any] | None = None) -> str:
        """Render with the variables HF templates expect; template errors become ChatTemplateError.
        ``variables`` (a client's) never replace those or the template's functions, and a template
        they break (a list where it wants text...) is a ChatTemplateError too."""
        context = {key: value for key, value in (variables or {}).items() if key not in _RESERVED_VARIABLES}
        context.update(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                       eos_token=self.eos_token)
        if tools:
            context["tools"] = tools
        try:
            return self._compiled.render(**context)
        except TemplateError as error:
            raise ChatTemplateError(f"chat template error: {error}") from error
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as error:
            if not variables:
                raise
            raise ChatTemplateError(f"chat template error with the variables sent: {error}") from error

    def __repr__(self) -> str:
        return f"JinjaChatTemplate(name={self.name!r})"


# --- named built-ins -------------------------------------------------------------------
# Written as Jinja like HF templates so they go through the same renderer. Newlines that
# matter are never placed directly after a block tag (trim_blocks would eat them).
# The very first BOS is left to the tokenizer; BOS/EOS *between* turns are literal text,
# as in text-generation-webui's instruction templates.

_CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shared head: pull out a leading system message, else use the template's default.
_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = default_system %}{% set turns = messages %}{% endif %}"
)

_ALPACA = (
    "{% set default_system = 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' %}"
    + _SPLIT_SYSTEM
    + "{% if system %}{{ system }}\n\n{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}\n\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

_VICUNA_V11 = (
    "{% set default_system = \"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}"
    + _SPLIT_SYSTEM
    + "{% if system %}{{ system }}\n\n{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}</s>\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Llama-2-chat: the system block lives inside the first [INST]; turns after the first
# are opened with a literal <s>.
_LLAMA_2 = (
    "{% set default_system = '' %}"
    + _SPLIT_SYSTEM
    + "{% for message in turns %}"
    "{% if not loop.first %}{% if message['role'] == 'user' %}<s>{% endif %}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if loop.first and system %}[INST] <<SYS>>\n{{ system }}\n<</SYS>>\n\n [/INST]{% endif %}"
    " {{ message['content'] }} </s>"
    "{% else %}{{ raise_exception('Llama-2 allows one system message, first') }}{% endif %}"
    "{% endfor %}"
    "{% if not turns and system %}[INST] <<SYS>>\n{{ system }}\n<</SYS>>\n\n [/INST]{% endif %}"
)

# Mistral Instruct: no system role; the system text is prepended to the first user turn.
_MISTRAL = (
    "{% set default_system = '' %}"
    + _SPLIT_SYSTEM
    + "{% for message in turns %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if loop.first and system %}{{ system }}\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if loop.first and system %}[INST] {{ system }} [/INST]{% endif %}"
    "{{ message['content'] }}</s>"
    "{% else %}{{ raise_exception('Mistral allows one system message, first') }}{% endif %}"
    "{% endfor %}"
    "{% if not turns and system %}[INST] {{ system }} [/INST]{% endif %}"
)

# Llama 3 instruct: a header per message, each message closed by <|eot_id|>.
_LLAMA_3 = (
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Gemma: user and model turns only; the system text opens the first user turn.
_GEMMA = (
    "{% set default_system = '' %}"
    + _SPLIT_SYSTEM
    + "{% for message in turns %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first and system %}{{ system }}\n\n{% endif %}"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if not turns and system %}<start_of_turn>user\n{{ system }}<end_of_turn>\n{% endif %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Phi-3: a role tag on its own line before each message, <|end|> after it.
_PHI_3 = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Metharme / Pygmalion-2: role tokens directly followed by the text, no separators.
_METHARME = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% else %}<|model|>{% endif %}"
    "{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|model|>{% endif %}"
)

# (display name, source, bos, eos); bos/eos only help stop-string derivation here.
_NAMED_TEMPLATES: MappingProxyType[str, tuple[str, str, str, str]] = MappingProxyType(
    {
        "chatml": ("ChatML", _CHATML, "", ""),
        "alpaca": ("Alpaca", _ALPACA, "", ""),
        "llama2": ("Llama-2", _LLAMA_2, "<s>", "</s>"),
        "llama3": ("Llama-3", _LLAMA_3, "<|begin_of_text|>", "<|eot_id|>"),
        "vicunav11": ("Vicuna-v1.1", _VICUNA_V11, "<s>", "</s>"),
        "mistral": ("Mistral", _MISTRAL, "<s>", "</s>"),
        "gemma": ("Gemma", _GEMMA, "<bos>", "<end_of_turn>"),
        "phi3": ("Phi-3", _PHI_3, "", "<|end|>"),
        "metharme": ("Metharme", _METHARME, "", ""),
    }
)
#: Other spellings of the same templates (text-generation-webui's file names among them).
_ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {"llamav2": "llama2", "llama2chat": "llama2", "llamav3": "llama3", "llama3instruct": "llama3",
     "vicuna": "vicunav11", "vicunav11": "vicunav11", "mistralinstruct": "mistral", "pygmalion2": "metharme",
     "phi3instruct": "phi3", "gemma2": "gemma", "gemma3": "gemma", "gemmainstruct": "gemma"}
)

NAMED_TEMPLATE_NAMES: tuple[str, ...] = tuple(entry[0] for entry in _NAMED_TEMPLATES.values())


def _name_key(name: str) -> str:
    """Lower-case and drop punctuation, so "llama2", "Llama-2" and "LLAMA 2" all match."""
    return "".join(character for character in name.lower() if character.isalnum())


def template_for_model(chat_template: str | None, eos_token: str = "", name: str = "") -> ChatTemplate:
    """A model's own Jinja template, or ChatML when the model ships none.

    ``bos_token`` is left empty on purpose: tokenizers that want a BOS add it while
    encoding, and a template adding it too would give two.
    """
    if chat_template:
        return JinjaChatTemplate(chat_template, bos_token="", eos_token=eos_token, name=name)
    return get_named_template("ChatML")


def get_named_template(name: str) -> ChatTemplate:
    """A fresh built-in template by name (case-insensitive); KeyError lists the valid names."""
    key = _name_key(name)
    entry = _NAMED_TEMPLATES.get(_ALIASES.get(key, key))
    if entry is None:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(NAMED_TEMPLATE_NAMES)}")
    display_name, source, bos_token, eos_token = entry
    return JinjaChatTemplate(source, bos_token=bos_token, eos_token=eos_token, name=display_name)
