"""Tools a chat may call: OpenAI's ``tools`` and ``tool_choice`` checked, and how
each template family writes calls, for the prompt and for the grammar that holds
``required`` and named calls to a function's schema.

Families, found in the chat template's text:

- ``hermes`` (Qwen 2.5/3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]``;
- ``llama3``: a bare ``{"name": ..., "parameters": ...}`` object;
- ``generic``, for templates that do not take ``tools``: ZSE describes the tools in
  a system message and holds the whole reply to one JSON object,
  ``{"tool_calls": [{"name": ..., "arguments": ...}]}`` or ``{"content": ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

#: How grammars lay JSON out (as the engine's `response_format` does): Python's
#: `json.dumps` separators, no free whitespace for a weak model to loop on.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Calls one reply may make when parallel calls are on: a weak model held to a
#: grammar that allows any number repeats calls until it runs out of tokens.
MAX_PARALLEL_CALLS = 8
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Family(Enum):
    GENERIC = "generic"
    HERMES = "hermes"
    MISTRAL = "mistral"
    LLAMA3 = "llama3"

    @property
    def arguments_key(self) -> str:
        return "parameters" if self is Family.LLAMA3 else "arguments"


def family_of(template: str | None) -> Family:
    """The markup a chat template's model calls tools in (generic where the
    template does not render ``tools`` at all)."""
    if not template or not re.search(r"\btools\b", template):
        return Family.GENERIC
    if "<tool_call>" in template:
        return Family.HERMES
    if "[TOOL_CALLS]" in template:
        return Family.MISTRAL
    return Family.LLAMA3


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """``auto`` (the model decides), ``required`` (at least one call) or one named
    function (``function`` set). ``none`` never gets this far: no tools at all."""

    mode: str
    function: str | None = None


def parse_tools(tools: Any) -> list[Function]:
    """OpenAI's ``tools`` list, checked (a ValueError naming the field)."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError("invalid value for 'tools': must be a list of tools")
    out: list[Function] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"invalid value for '{where}': only function tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"invalid value for '{where}.function': must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"invalid value for '{where}.function.name': must be 1-64 letters, digits, "
                "'_', '.' or '-'"
            )
        if any(f.name == name for f in out):
            raise ValueError(f"invalid value for '{where}.function.name': {name!r} is repeated")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ValueError(f"invalid value for '{where}.function.parameters': must be an object")
        description = fn.get("description")
        out.append(
            Function(name, description if isinstance(description, str) else None, dict(params))
        )
    return out


def parse_tool_choice(choice: Any, functions: Sequence[Function]) -> ToolChoice | None:
    """OpenAI's ``tool_choice``; None for ``none`` (or no tools)."""
    if choice is None:
        choice = "auto"
    if choice == "none" or not functions:
        if isinstance(choice, Mapping) or choice == "required":
            raise ValueError("invalid value for 'tool_choice': there are no tools to call")
        return None
    if choice in ("auto", "required"):
        return ToolChoice(choice)
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if choice.get("type") == "function" and isinstance(name, str):
            if not any(f.name == name for f in functions):
                raise ValueError(f"invalid value for 'tool_choice': no tool is named {name!r}")
            return ToolChoice("function", name)
    raise ValueError(
        "invalid value for 'tool_choice': must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}"
    )


def template_tools(functions: Sequence[Function]) -> list[dict[str, Any]]:
    """``tools`` as templates take them (OpenAI's shape, as transformers passes it)."""
    out = []
    for f in functions:
        fn: dict[str, Any] = {"name": f.name}
        if f.description is not None:
            fn["description"] = f.description
        fn["parameters"] = f.parameters
        out.append({"type": "function", "function": fn})
    return out


# The generic format -------------------------------------------------------------------


def generic_history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls and results for a template without tools: each call as the JSON
    the generic format has the model write, each result as a user message (every
    template takes that role)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            result = {"tool_call_id": m.get("tool_call_id"), "content": m.get("content")}
            text = json.dumps({"tool_result": result}, ensure_ascii=False)
            out.append({"role": "user", "content": text})
        elif role == "assistant" and m.get("tool_calls"):
            written = [_written_call(c) for c in m["tool_calls"]]
            text = json.dumps({"tool_calls": written}, ensure_ascii=False)
            out.append({"role": "assistant", "content": text})
        else:
            out.append(dict(m))
    return out


def generic_messages(
    messages: Sequence[Mapping[str, Any]], functions: Sequence[Function], choice: ToolChoice
) -> list[dict[str, Any]]:
    """The conversation with a system message that lists the tools and the shape of
    the reply (joined to the conversation's own system message)."""
    specs = [
        {
            "name": f.name,
            **({"description": f.description} if f.description else {}),
            "parameters": f.parameters,
        }
        for f in functions
    ]
    calls = '{"tool_calls": [{"name": <function name>, "arguments": <its arguments>}]}'
    if choice.mode == "auto":
        how = (
            f'To call functions, reply {calls}; to answer directly, reply {{"content": <answer>}}.'
        )
    else:
        how = f"Reply {calls}."
    system = (
        "You can call these functions (each one's arguments as a JSON schema):\n"
        f"{json.dumps(specs, ensure_ascii=False)}\n{how}"
    )
    out = [dict(m) for m in messages]
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {"role": "system", "content": f"{out[0].get('content') or ''}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _written_call(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError("invalid value for 'messages': a tool call needs 'function.name'")
    return {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            raise ValueError(
                f"invalid value for 'messages': tool call arguments {args!r} are not JSON"
            ) from None
    return args


# Grammars -----------------------------------------------------------------------------


def _call_schema(
    functions: Sequence[Function], choice: ToolChoice, args_key: str
) -> dict[str, Any]:
    chosen = [f for f in functions if choice.function in (None, f.name)]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, args_key: f.parameters},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def answer_rules(
    family: Family,
    functions: Sequence[Function],
    choice: ToolChoice,
    parallel: bool,
    literal: Any,
) -> str | None:
    """Lark rules for the reply's answer (``answer: ...``), or None where nothing
    holds it (``auto`` in a template's own markup: the model may answer in text).
    ``literal(text)`` writes marker text as the vocabulary spells it."""
    call = _call_schema(functions, choice, family.arguments_key)
    most = MAX_PARALLEL_CALLS if parallel else 1
    many = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
    if family is Family.GENERIC:
        calls = {
            "type": "object",
            "properties": {"tool_calls": many},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
        if choice.mode == "auto":
            content = {
                "type": "object",
                "properties": {"content": {"type": "string"}},
                "required": ["content"],
                "additionalProperties": False,
            }
            return f"answer: {json_rule({'anyOf': [calls, content]})}"
        return f"answer: {json_rule(calls)}"
    if choice.mode == "auto":
        return None
    if family is Family.HERMES:
        repeat = f' ("\\n" call){{0,{most - 1}}}' if parallel else ""
        tags = literal("<tool_call>"), literal("</tool_call>")
        return f'answer: call{repeat}\ncall: {tags[0]} "\\n" {json_rule(call)} "\\n" {tags[1]}'
    if family is Family.MISTRAL:
        return f"answer: {literal('[TOOL_CALLS]')} {json_rule(many)}"
    return f"answer: {json_rule(call)}"
