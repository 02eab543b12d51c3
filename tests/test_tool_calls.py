"""Tool calls and thoughts (issue 18), end to end: prompts rendered as transformers
renders them, calls the grammar holds to the function's schema on SmolLM2 (the
generic format) and on a tiny random Qwen3 (Hermes markup, its markers one token
each as in Qwen's vocabulary), streamed calls that join into the non-streamed ones,
the thought apart from the answer (think tags of several tokens on SmolLM2, of one
on the tiny model), and the 400s. Driven with the official `openai` SDK against a
real `zse serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import tiny_models
import tool_templates
import zse
from conftest import REFERENCE_DIR
from serving import ServerProcess

#: SmolLM2's unused control tokens 3-6 respelled as Qwen3 spells its markers: user-
#: defined tokens, one token each, written as text in replies.
MARKERS = {3: "<think>", 4: "</think>", 5: "<tool_call>", 6: "</tool_call>"}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "東京"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für eine Stadt",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
WEIRD = {"type": "object", "properties": {"x": {"type": "weird"}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "celsius", "x": 0.5, "y": 1e-05}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And in Tokyo?"},
]


def _valid_call(call: Any) -> dict[str, Any]:
    """A returned call: an id, a known function, arguments valid for its schema."""
    assert call.id and call.type == "function"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


# Prompts --------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["HERMES", "MISTRAL", "LLAMA3"], ids=str.lower)
def test_prompts_with_tools_render_byte_for_byte_as_transformers_does(
    qwen_tiny: Path, template: str
) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    source = getattr(tool_templates, template)
    with zse.Engine(qwen_tiny, chat_template=source) as engine:
        plan = engine.plan_chat(HISTORY, tools=TOOLS, tool_choice="auto")
        # transformers takes the arguments as an object, as ZSE hands them on.
        history = json.loads(json.dumps(HISTORY))
        for m in history:
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
            if m["content"] is None:
                m["content"] = ""
        [want], _ = render_jinja_template(
            conversations=[history],
            tools=TOOLS,
            chat_template=source,
            add_generation_prompt=True,
            bos_token=engine.metadata["bos_token"] or "",
            eos_token="<|im_end|>",
        )
    assert plan.prompt == want
    assert "Wetter für eine Stadt" in plan.prompt


def test_a_template_without_tools_gets_the_generic_format(engine: zse.Engine) -> None:
    plan = engine.plan_chat(HISTORY, tools=TOOLS, tool_choice="required")
    assert plan.family is zse.chat.Family.GENERIC
    assert '"name": "get_weather", "description": "Wetter für eine Stadt"' in plan.prompt
    # The earlier call and its result, as the generic format writes them.
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"' in plan.prompt
    assert (
        '{"tool_result": {"tool_call_id": "call_1", "content": "{\\"temp\\": 21}"}}' in plan.prompt
    )
    assert plan.response_format is not None and plan.response_format["type"] == "lark"
    assert engine.plan_chat(ASK, tools=TOOLS, tool_choice="none").response_format is None


def test_engine_chat_returns_calls_alike_whole_streamed_and_async(qwen3_markers: Path) -> None:
    """`zse.Engine` without a server: chat, stream's completion and achat agree."""
    import asyncio

    ask: dict[str, Any] = dict(
        tools=TOOLS, tool_choice="required", temperature=1.0, seed=3, max_tokens=300
    )
    with zse.Engine(qwen3_markers, chat_template=tool_templates.HERMES) as engine:
        whole = engine.chat(ASK, **ask)
        stream = engine.stream(ASK, **ask)
        text = "".join(stream)
        later = asyncio.run(engine.achat(ASK, **ask))
    assert whole.finish_reason == "tool_calls" and whole.content is None
    assert text == whole.text and "<tool_call>" in text
    for call in whole.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    for other in (stream.completion, later):
        assert other is not None
        assert [(c.name, c.arguments) for c in other.tool_calls] == [
            (c.name, c.arguments) for c in whole.tool_calls
        ]
        assert other.finish_reason == "tool_calls"


# Calls through the SDK ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen3 whose vocabulary has Qwen3's markers (`MARKERS`)."""
    folder = tmp_path_factory.mktemp("qwen3-markers")
    gguf_file, out = folder / "qwen3-tiny-markers.gguf", folder / "qwen3-tiny-markers.zse"
    source = REFERENCE_DIR / "qwen2-tiny-random-f32.gguf"
    tiny_models.write("qwen3", gguf_file, source, user_tokens=MARKERS)
    zse.convert(gguf_file, out, quant="keep", progress=False)
    return out


def _template(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    path = tmp_path_factory.mktemp("tmpl") / f"{name.lower()}.jinja"
    path.write_text(getattr(tool_templates, name))
    return str(path)


@pytest.fixture(scope="module", params=["smollm2", "tiny-hermes", "tiny-mistral", "tiny-llama3"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    """SmolLM2, whose template has no tools (the generic format), and the tiny
    random Qwen3 with each family's template (noise: only the grammar makes calls)."""
    if request.param == "smollm2":
        args: list[str] = []
        model = request.getfixturevalue("default_model")
    else:
        family = request.param.removeprefix("tiny-").upper()
        args = ["--chat-template", _template(tmp_path_factory, family)]
        model = request.getfixturevalue("qwen3_markers")
    with ServerProcess(model, *args) as server:
        yield openai.OpenAI(base_url=server.api_base, api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_required_and_named_calls_always_validate(client: openai.OpenAI, choice: Any) -> None:
    for seed in range(6):
        r = client.chat.completions.create(
            model="default",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            n=3,
            max_tokens=400,
        )
        for c in r.choices:
            assert c.finish_reason == "tool_calls", (seed, c.message)
            assert c.message.tool_calls and not c.message.content
            for call in c.message.tool_calls:
                _valid_call(call)
                if isinstance(choice, dict):
                    assert call.function.name == "get_time"


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = client.chat.completions.create(
            model="default",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        assert r.choices[0].message.tool_calls is not None
        assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_calls_join_into_the_whole_ones(client: openai.OpenAI) -> None:
    for seed in range(3):
        ask = dict(
            model="default",
            messages=HISTORY,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        whole = client.chat.completions.create(**ask).choices[0]
        calls: dict[int, dict[str, str]] = {}
        content, finish = "", None
        for chunk in client.chat.completions.create(**ask, stream=True):
            d = chunk.choices[0].delta
            content += d.content or ""
            finish = chunk.choices[0].finish_reason or finish
            for c in d.tool_calls or []:
                if c.id is not None:  # a call's first piece: its id, type and name
                    assert c.index not in calls and c.type == "function" and c.function.name
                    calls[c.index] = {
                        "name": c.function.name,
                        "arguments": c.function.arguments or "",
                    }
                else:
                    assert c.function.name is None
                    calls[c.index]["arguments"] += c.function.arguments
        assert finish == whole.finish_reason == "tool_calls"
        assert not content
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls or []
        ]


def test_auto_answers_or_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default",
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=1,
        n=4,
        max_tokens=120,
    )
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            for call in c.message.tool_calls or []:
                _valid_call(call)
        else:
            assert c.message.tool_calls is None
            assert "<tool_call>" not in (c.message.content or "")
            assert '"tool_calls"' not in (c.message.content or "")


def test_tool_errors_are_400s_naming_the_field(client: openai.OpenAI) -> None:
    bad = [
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        # A function's schema the grammar engine cannot compile.
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": WEIRD}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=ASK, **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


# Thoughts -------------------------------------------------------------------------


@dataclass
class Thinker:
    server: ServerProcess
    #: The ids that spell "</think>" (several on SmolLM2, one on the tiny model).
    close: list[int]
    #: A logit bias on them that makes the thought end within tens of tokens (the
    #: random model's logits are peaked: it needs more).
    bias: int

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.api_base, api_key="unused", max_retries=0)


@pytest.fixture(scope="module", params=["smollm2", "tiny-qwen3"])
def thinker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Thinker]:
    """A server whose template opens a thought: SmolLM2, whose vocabulary spells the
    think tags in pieces, and the tiny Qwen3, whose vocabulary has them whole."""
    if request.param == "smollm2":
        model = request.getfixturevalue("default_model")
        close, bias = request.getfixturevalue("engine").tokenize("</think>"), 6
    else:
        model = request.getfixturevalue("qwen3_markers")
        close, bias = [next(i for i, t in MARKERS.items() if t == "</think>")], 15
    with ServerProcess(model, "--chat-template", _template(tmp_path_factory, "THINKING")) as s:
        yield Thinker(s, close, bias)


def test_the_thought_goes_to_reasoning_content(thinker: Thinker) -> None:
    client = thinker.client()
    # The bias makes "</think>" likely, so the thought ends early; the same seed on the
    # raw prompt gives the same text, which the chat reply must split at "</think>".
    bias = {str(t): thinker.bias for t in thinker.close}
    ended = 0
    for seed in range(4):
        ask: dict[str, Any] = dict(
            model="default", temperature=1.0, seed=seed, max_tokens=60, logit_bias=bias
        )
        m = client.chat.completions.create(messages=ASK, **ask).choices[0].message
        raw = client.completions.create(prompt=_thinking_prompt(ASK), **ask).choices[0].text
        thought, sep, answer = raw.partition("</think>")
        ended += bool(sep)
        assert m.reasoning_content == thought
        assert m.content == (answer.lstrip("\n") if sep else "")
        # Streamed, the thought and the answer arrive apart and join to the same.
        streamed = {"reasoning_content": "", "content": ""}
        for chunk in client.chat.completions.create(messages=ASK, stream=True, **ask):
            d = chunk.choices[0].delta.model_dump()
            for key in streamed:
                streamed[key] += d.get(key) or ""
        assert streamed == {"reasoning_content": thought, "content": m.content}
    assert ended >= 1


def test_a_grammar_holds_only_after_the_thought(thinker: Thinker) -> None:
    client = thinker.client()
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    bias = {str(t): thinker.bias + 2 for t in thinker.close}
    finished = 0
    for seed in range(8):
        r = client.chat.completions.create(
            model="default",
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=300,
            logit_bias=bias,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        )
        c = r.choices[0]
        if c.finish_reason == "stop":
            finished += 1
            assert c.message.reasoning_content is not None
            assert "</think>" not in c.message.reasoning_content
            jsonschema.validate(json.loads(c.message.content or ""), schema)
    # With "</think>" one token the bias ends every thought; in pieces, some.
    assert finished == 8 if len(thinker.close) == 1 else finished >= 1, finished


def test_thinking_off_reaches_the_template(thinker: Thinker) -> None:
    client = thinker.client()
    r = client.chat.completions.create(
        model="default",
        messages=ASK,
        temperature=0,
        max_tokens=20,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    raw = (
        client.completions.create(
            model="default",
            prompt=_thinking_prompt(ASK, thinking=False),
            temperature=0,
            max_tokens=20,
        )
        .choices[0]
        .text
    )
    assert r.choices[0].message.content == raw
    assert r.choices[0].message.reasoning_content == ""


def _thinking_prompt(messages: list[dict[str, Any]], thinking: bool = True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {} if thinking else {"enable_thinking": False}
    [text], _ = render_jinja_template(
        conversations=[messages],
        chat_template=tool_templates.THINKING,
        add_generation_prompt=True,
        **kwargs,
    )
    return text
