"""Chat templates: named built-ins render the documented formats; markers are derived."""

from __future__ import annotations

import pytest

from kobold_api.chat.templates import (
    NAMED_TEMPLATE_NAMES,
    ChatTemplate,
    ChatTemplateError,
    JinjaChatTemplate,
    get_named_template,
    render_open_turn,
)

CONVERSATION = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]

# A ChatML template written the way Hugging Face tokenizer configs carry them (one line,
# with a default system message, as SmolLM2's does).
CHATML_HF_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_hf_style_chatml_template_renders() -> None:
    template = JinjaChatTemplate(CHATML_HF_STYLE)
    assert template.render(CONVERSATION[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION[1:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    assert isinstance(template, ChatTemplate)


def test_block_tags_are_trimmed_like_hugging_face() -> None:
    """trim_blocks drops the newline after a block tag; lstrip_blocks the indent before it."""
    template = JinjaChatTemplate(
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[{{ m['content'] }}]\n"
        "    {% endif %}\n{% endfor %}\nend"
    )
    assert template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False) == (
        "[a]\n[b]\nend"
    )


def test_chatml_markers_are_derived() -> None:
    template = JinjaChatTemplate(CHATML_HF_STYLE)
    assert template.stop_strings == ["<|im_end|>", "<|im_start|>user"]
    assert template.assistant_prefix == "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("name", "expected", "stops", "prefix"),
    [
        (
            "ChatML",
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
            ["<|im_end|>", "<|im_start|>user"],
            "<|im_start|>assistant\n",
        ),
        (
            "Alpaca",
            "SYS\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\nbye\n\n### Response:\n",
            ["### Instruction:"],
            "### Response:\n",
        ),
        (
            "Llama-2",
            "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST]",
            ["</s>", "<s>[INST]", "[INST]"],
            "",
        ),
        (
            "Vicuna-v1.1",
            "SYS\n\nUSER: hi\nASSISTANT: hello</s>\nUSER: bye\nASSISTANT:",
            ["</s>", "USER:"],
            "ASSISTANT:",
        ),
        (
            "Mistral",
            "[INST] SYS\n\nhi [/INST]hello</s>[INST] bye [/INST]",
            ["</s>", "[INST]"],
            "",
        ),
        (
            "Metharme",
            "<|system|>SYS<|user|>hi<|model|>hello<|user|>bye<|model|>",
            ["<|user|>"],
            "<|model|>",
        ),
    ],
)
def test_named_templates(name: str, expected: str, stops: list[str], prefix: str) -> None:
    template = get_named_template(name)
    assert template.render(CONVERSATION, add_generation_prompt=True) == expected
    assert template.stop_strings == stops
    assert template.assistant_prefix == prefix


def test_named_templates_default_system_prompts() -> None:
    user_only = [{"role": "user", "content": "hi"}]
    assert get_named_template("alpaca").render(user_only, True) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nhi\n\n### Response:\n"
    )
    assert get_named_template("vicuna-v1.1").render(user_only, True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.\n\nUSER: hi\nASSISTANT:"
    )
    assert get_named_template("llama-2").render(user_only, True) == "[INST] hi [/INST]"
    assert get_named_template("metharme").render(user_only, True) == "<|user|>hi<|model|>"


@pytest.mark.parametrize("alias", ["chatml", "CHATML", "ChatML", "chat-ml"])
def test_named_lookup_is_case_insensitive(alias: str) -> None:
    assert get_named_template(alias).render([{"role": "user", "content": "x"}], False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )


def test_named_lookup_tolerates_punctuation_variants() -> None:
    assert get_named_template("llama2").render([{"role": "user", "content": "x"}], False) == "[INST] x [/INST]"
    assert get_named_template("Vicuna v1.1").render([{"role": "user", "content": "x"}], True).endswith(
        "USER: x\nASSISTANT:"
    )


def test_unknown_template_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as raised:
        get_named_template("zephyr")
    message = str(raised.value)
    for name in NAMED_TEMPLATE_NAMES:
        assert name in message
    assert set(NAMED_TEMPLATE_NAMES) == {"ChatML", "Alpaca", "Llama-2", "Llama-3", "Vicuna-v1.1", "Mistral",
                                         "Gemma", "Phi-3", "Metharme"}


#: text-generation-webui's instruction template names (its legacy clients send these).
TEXTGEN_NAMES = {"Alpaca": "Alpaca", "Vicuna-v1.1": "Vicuna-v1.1", "ChatML": "ChatML", "Llama-v2": "Llama-2",
                 "Llama-v3": "Llama-3", "Mistral": "Mistral", "Gemma": "Gemma", "Phi-3": "Phi-3"}
TEXTGEN_CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("sent, name", sorted(TEXTGEN_NAMES.items()))
def test_textgen_instruction_template_names_resolve(sent: str, name: str) -> None:
    template = get_named_template(sent)
    assert template.name == name
    assert "Hi" in template.render(TEXTGEN_CONVERSATION, True)


@pytest.mark.parametrize("name, expected, stop", [
    ("Llama-v3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("Gemma", "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"),
    ("Phi-3", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
              "<|user|>\nBye<|end|>\n<|assistant|>\n", "<|end|>"),
])
def test_new_named_templates_render_their_formats(name: str, expected: str, stop: str) -> None:
    template = get_named_template(name)
    assert template.render(TEXTGEN_CONVERSATION, True) == expected
    assert stop in template.stop_strings


def test_named_templates_are_fresh_instances() -> None:
    assert get_named_template("ChatML") is not get_named_template("ChatML")


def test_llama3_like_template_markers_and_bos() -> None:
    template = JinjaChatTemplate(LLAMA3_LIKE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    rendered = template.render([{"role": "user", "content": " hi "}], True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert template.stop_strings == ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"]
    assert template.assistant_prefix == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_render_open_turn_cuts_the_end_of_turn_and_keeps_exact_partial_text() -> None:
    template = JinjaChatTemplate(LLAMA3_LIKE)
    # The template trims content; the partial text (trailing space included) must survive.
    text = render_open_turn(template, [{"role": "user", "content": "hi"}], "assistant", "Once upon a ")
    assert text == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOnce upon a "
    )


def test_render_open_turn_on_named_templates() -> None:
    history = [{"role": "user", "content": "hi"}]
    assert render_open_turn(get_named_template("ChatML"), history, "assistant", "Al") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nAl"
    )
    assert render_open_turn(get_named_template("Llama-2"), history, "assistant", "Al") == "[INST] hi [/INST] Al"
    assert render_open_turn(get_named_template("Mistral"), history, "assistant", "Al") == "[INST] hi [/INST]Al"


def test_raise_exception_becomes_chat_template_error() -> None:
    template = JinjaChatTemplate(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}], False) == "ok"
    with pytest.raises(ChatTemplateError, match="no system role"):
        template.render([{"role": "system", "content": "x"}], False)


def test_markers_derived_even_when_template_requires_a_system_message() -> None:
    template = JinjaChatTemplate(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert template.stop_strings == ["[/assistant]", "[user]"]
    assert template.assistant_prefix == "[assistant]"


def test_underivable_markers_fall_back_to_empty() -> None:
    template = JinjaChatTemplate("{{ raise_exception('never renders') }}")
    assert template.stop_strings == []
    assert template.assistant_prefix == ""


def test_invalid_template_syntax_is_reported() -> None:
    with pytest.raises(ChatTemplateError):
        JinjaChatTemplate("{% for m in messages %}")


def test_sandbox_is_immutable() -> None:
    template = JinjaChatTemplate("{% set _ = messages.append({'role': 'user'}) %}{{ messages | length }}")
    with pytest.raises(ChatTemplateError):
        template.render([], False)


def test_tojson_does_not_html_escape() -> None:
    template = JinjaChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert template.render([{"role": "user", "content": "<b> & 'é'"}], False) == "\"<b> & 'é'\""


def test_a_template_that_lays_out_tools_gets_them() -> None:
    source = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
              "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
              "{% for call in m.get('tool_calls', []) %}[call {{ call['function']['name'] }}"
              "({{ call['function']['arguments']['city'] }})]{% endfor %}\n{% endfor %}")
    template = JinjaChatTemplate(source)
    assert template.renders_tools and not JinjaChatTemplate("{{ messages[0]['content'] }}").renders_tools
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]
    text = template.render(messages, False, tools=tools)
    assert '"name": "get_weather"' in text and "[call get_weather(Oslo)]" in text
    assert "<tools>" not in template.render(messages, False)
