"""`zse.chat.ReplyParser`: a reply's text, however it is cut into deltas, splits into
the same reasoning, content and tool calls as when it arrives whole; streamed call
pieces join into the whole call; markup never reaches the content."""

from __future__ import annotations

import json
import random

import pytest
from zse.chat import Family, ReplyParser

Case = tuple[Family | None, str, str, str, str, list[tuple[str, str]]]

# (family, thinking, reply text, reasoning, content, [(name, arguments)])
CASES: list[Case] = [
    (None, "no", "Hello <tool_call> world", "", "Hello <tool_call> world", []),
    (
        Family.HERMES,
        "no",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
        '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call>',
        "",
        "Let me look.\n",
        [("get_weather", '{"city": "Zürich", "days": [1, 2]}'), ("t", "{}")],
    ),
    (Family.HERMES, "no", "a <tool_cal b < c", "", "a <tool_cal b < c", []),
    (
        Family.HERMES,
        "no",
        "<tool_call>\nnot json at all\n</tool_call>",
        "",
        "<tool_call>\nnot json at all\n</tool_call>",
        [],
    ),
    (
        Family.MISTRAL,
        "no",
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": "]"}}, {"name": "b", "arguments": {}}]',
        "",
        "",
        [("a", '{"x": "]"}'), ("b", "{}")],
    ),
    (
        Family.MISTRAL,
        "no",
        ' [{"name": "a", "arguments": {"q": 1.5e3}}]',
        "",
        "",
        [("a", '{"q": 1.5e3}')],
    ),
    (Family.MISTRAL, "no", "[1] is a list", "", "[1] is a list", []),
    (
        Family.LLAMA3,
        "no",
        '<|python_tag|>{"name": "f", "parameters": {"a": null, "b": true}}',
        "",
        "",
        [("f", '{"a": null, "b": true}')],
    ),
    (Family.LLAMA3, "no", "Sure: {not a call}", "", "Sure: {not a call}", []),
    (
        Family.GENERIC,
        "no",
        '{"content": "line\\none \\"q\\" \\u00e9 \\ud83d\\ude00"}',
        "",
        'line\none "q" é 😀',
        [],
    ),
    (
        Family.GENERIC,
        "no",
        '{"tool_calls": [{"name": "f", "arguments": {"k": "{\\"}"}}, '
        '{"name": "g", "arguments": {"n": -2}}]}',
        "",
        "",
        [("f", '{"k": "{\\"}"}'), ("g", '{"n": -2}')],
    ),
    (
        None,
        "open",
        "I think </thin>so.</think>\n\nThe answer.",
        "I think </thin>so.",
        "The answer.",
        [],
    ),
    (None, "open", "still thinking", "still thinking", "", []),
    (None, "may", "  <think>hm</think>ok", "hm", "ok", []),
    (None, "may", "<thin", "", "<thin", []),
    (
        Family.HERMES,
        "open",
        'plan</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        "plan",
        "",
        [("f", '{"a": 1}')],
    ),
]


def _stream(parser: ReplyParser, text: str, rng: random.Random) -> tuple[str, str, dict]:
    reasoning = content = ""
    calls: dict[int, dict[str, str]] = {}
    i = 0
    parts = []
    while i < len(text):
        n = rng.randint(1, 6)
        parts.append(parser.feed(text[i : i + n]))
        i += n
    parts.append(parser.finish())
    for p in parts:
        reasoning += p.reasoning
        content += p.content
        for c in p.tool_calls:
            if c.id is not None:
                assert c.index not in calls, "a call opened twice"
                assert c.name
                calls[c.index] = {"id": c.id, "name": c.name, "arguments": c.arguments}
            else:
                calls[c.index]["arguments"] += c.arguments
    return reasoning, content, calls


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_replies_split_the_same_whole_and_streamed(case: Case) -> None:
    family, thinking, text, reasoning, content, calls = case
    for seed in range(20):
        parser = ReplyParser(family, thinking)
        got_reasoning, got_content, streamed = _stream(parser, text, random.Random(seed))
        assert (got_reasoning, got_content) == (reasoning, content), seed
        assert (parser.reasoning, parser.content) == (reasoning, content)
        assert [(c.name, c.arguments) for c in parser.tool_calls] == calls
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == calls
        assert [c["id"] for c in streamed.values()] == [c.id for c in parser.tool_calls]
        for _, args in calls:
            json.loads(args)
