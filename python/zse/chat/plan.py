"""A chat request to what the engine runs: the prompt (tools rendered by the
template, or described in the generic format), the grammar (tool calls that must
happen, a response format, after any thought) and the parser for the reply."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .reply import THINK_CLOSE, THINK_OPEN, ReplyParser
from .tools import (
    Family,
    answer_rules,
    family_of,
    generic_history,
    generic_messages,
    json_rule,
    parse_tool_choice,
    parse_tools,
    template_tools,
)


class _Engine(Protocol):
    metadata: dict[str, Any]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        chat_template_kwargs: Mapping[str, Any] | None,
    ) -> str: ...

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class ChatPlan:
    prompt: str
    prompt_ids: list[int]
    #: The grammar for the engine (its ``response_format``), or None.
    response_format: dict[str, Any] | None
    #: How the reply writes tool calls; None when the request has no tools.
    family: Family | None
    #: ``open`` (the prompt opened a thought), ``may`` (the reply may) or ``no``.
    thinking: str

    def parser(self) -> ReplyParser:
        return ReplyParser(self.family, self.thinking)

    @classmethod
    def make(
        cls,
        engine: _Engine,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        response_format: Mapping[str, Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatPlan:
        """Raises ValueError naming the field at fault."""
        functions = parse_tools(tools) if tools else []
        choice = parse_tool_choice(tool_choice, functions)
        if choice is not None and response_format and response_format.get("type") != "text":
            raise ValueError(
                "invalid value for 'response_format': together with tools it is not "
                "supported yet (use tool_choice 'none', or no response_format)"
            )
        template = engine.metadata.get("chat_template")
        native = family_of(template)
        kwargs = dict(chat_template_kwargs or {})
        if native is Family.GENERIC:
            messages = generic_history(messages)
            if choice is not None:
                messages = generic_messages(messages, functions, choice)
        elif choice is not None:
            kwargs["tools"] = template_tools(functions)
        prompt = engine.apply_chat_template(messages, chat_template_kwargs=kwargs or None)
        ids = engine.tokenize(prompt, add_bos=True)
        thinking = "no"
        if _thinks(template):
            thinking = "open" if prompt.rstrip().endswith(THINK_OPEN) else "may"

        def literal(text: str) -> str:
            # A marker that is one special token is not text: name it by id.
            token = engine.tokenize(text)
            if len(token) == 1 and not engine.detokenize(token, skip_special_tokens=True):
                return f"<[{token[0]}]>"
            return json.dumps(text)

        rules = None
        if choice is not None:
            rules = answer_rules(native, functions, choice, parallel_tool_calls, literal)
        elif response_format and thinking != "no":
            rules = _format_rules(response_format)
        grammar: dict[str, Any] | None = None
        if rules is not None:
            # Its errors (a function's schema it cannot compile) name the field at fault.
            param = "response_format" if choice is None else "tools"
            lark = _with_thought(rules, thinking, literal)
            grammar = {"type": "lark", "lark": lark, "param": param}
        elif response_format and response_format.get("type") != "text":
            grammar = dict(response_format)
        return cls(prompt, ids, grammar, native if choice is not None else None, thinking)


def _thinks(template: str | None) -> bool:
    """Whether the model thinks in ``<think>...</think>``: its template says so (Qwen3's
    opens or strips thoughts, DeepSeek-R1 distills' split history at ``</think>``). Not
    the vocabulary: a model may have the tags as tokens and never think (Qwen3's
    instruct releases), and a grammar that let it open a thought would let it ramble."""
    return bool(template) and (THINK_OPEN in template or THINK_CLOSE in template)


def _format_rules(response_format: Mapping[str, Any]) -> str | None:
    """A response format as the ``answer`` rule, to follow a thought."""
    kind = response_format.get("type")
    if kind == "json_object":
        return f"answer: {json_rule({'type': 'object'})}"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError(
                "invalid value for 'response_format': 'json_schema.schema' must be an object"
            )
        return f"answer: {json_rule(schema)}"
    return None


def _with_thought(rules: str, thinking: str, literal: Any) -> str:
    """The grammar's start: the answer, after the thought where there is one. The
    thought is free text up to the first ``</think>``; at most two newlines follow it
    (Qwen3 writes two), so a weak model cannot loop on them."""
    thought = f"thought[lazy]: /(.|\\n)*{_regex_escape(THINK_CLOSE)}/\nNL: /\\n\\n?/\n"
    if thinking == "open":
        return f"start: thought NL? answer\n{thought}{rules}\n"
    if thinking == "may":
        return f"start: ({literal(THINK_OPEN)} thought NL?)? answer\n{thought}{rules}\n"
    return f"start: answer\n{rules}\n"


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "/\\.*+?()[]{}|^$" else c for c in text)
