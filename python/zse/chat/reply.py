"""A chat reply as it streams: the thought (``<think>...</think>``) apart from the
answer, and the answer apart into content and tool calls in the template
family's markup. Markup never reaches ``content``; a marker's first characters
are held back until the next text says whether the marker follows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .jsonscan import JsonScanner, Path
from .tools import Family

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class CallDelta:
    """A call's first delta has ``id`` and ``name``; later ones arguments text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ReplyDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: ReplyDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments' JSON text, as the model wrote it (what streamed deltas join to)."""


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _Thought:
    """Splits the thought from the answer. ``state``: ``open`` (the prompt opened a
    thought), ``may`` (the reply may start one) or ``no``."""

    def __init__(self, state: str) -> None:
        self.state = {"open": "thinking", "may": "start", "no": "answer"}[state]
        self.buf = ""
        self.after_thought = False  # newlines that end a thought are not the answer

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text now certain."""
        self.buf += text
        reasoning = answer = ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(THINK_OPEN):
                self.state, self.buf = "thinking", lead[len(THINK_OPEN) :]
            elif not (THINK_OPEN.startswith(lead)):
                self.state = "answer"
            else:
                return "", ""
        if self.state == "thinking":
            end = self.buf.find(THINK_CLOSE)
            if end < 0:
                keep = _held(self.buf, THINK_CLOSE)
                reasoning, self.buf = (
                    self.buf[: len(self.buf) - keep],
                    self.buf[len(self.buf) - keep :],
                )
                return reasoning, ""
            reasoning, self.buf = self.buf[:end], self.buf[end + len(THINK_CLOSE) :]
            self.state, self.after_thought = "answer", True
        if self.state == "answer":
            if self.after_thought:
                self.buf = self.buf.lstrip("\n")
                self.after_thought = not self.buf
            answer, self.buf = self.buf, ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        return (rest, "") if self.state == "thinking" else ("", rest)


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""


class ReplyParser:
    """Feed it a reply's text deltas; it returns what each adds to the reply's
    reasoning, content and tool calls, and holds the whole reply for ``result``."""

    def __init__(self, family: Family | None, thinking: str = "no") -> None:
        self._family = family
        self._thought = _Thought(thinking)
        self._pending = ""  # answer text not yet placed
        self._scanner: JsonScanner | None = None
        self._scanned = ""  # what the scanner took, should it turn out not to be calls
        self._after_call = ""  # text until a call's closing marker
        self._calls: list[_Call] = []
        self._base = 0  # call index of the running scanner's first call
        self.reasoning = ""
        self.content = ""
        self._begun = False  # the answer has begun (past leading whitespace)
        self._trim = False  # drop the newlines that follow a call
        self._marker_len = 0

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c.id, c.name, c.arguments) for c in self._calls]

    def feed(self, text: str) -> ReplyDelta:
        reasoning, answer = self._thought.feed(text)
        out = ReplyDelta(reasoning=reasoning)
        out.add(self._answer(answer, final=False))
        return self._record(out)

    def finish(self) -> ReplyDelta:
        """The text held back, at the end of the reply."""
        reasoning, answer = self._thought.finish()
        out = ReplyDelta(reasoning=reasoning)
        out.add(self._answer(answer, final=True))
        if self._scanner is not None:
            out.add(self._end_scan(complete=False))
        return self._record(out)

    def _record(self, d: ReplyDelta) -> ReplyDelta:
        self.reasoning += d.reasoning
        self.content += d.content
        return d

    # Answer text -------------------------------------------------------------------

    def _answer(self, text: str, final: bool) -> ReplyDelta:
        self._pending += text
        out = ReplyDelta()
        while self._pending:
            if self._scanner is not None:
                out.add(self._scan())
                if self._scanner is not None:
                    break
                continue
            if self._after_call:
                if not self._close_marker(final):
                    break
                continue
            if self._trim:  # newlines after a call are not content
                self._pending = self._pending.lstrip("\n")
                self._trim = not self._pending
                if self._trim:
                    break
            start = self._call_start(final)
            if start is None:  # not known yet: wait for more text
                break
            before, marker_len, path_is_call, content_path = start
            if before:
                out.content += before
            # The marker is kept, to give back should what follows not be a call.
            self._scanned = self._pending[len(before) : len(before) + marker_len]
            self._marker_len = marker_len
            self._pending = self._pending[len(before) + marker_len :]
            if path_is_call is None:
                break
            self._scanner = JsonScanner(path_is_call, (self._family_args(),), content_path)
            self._base = len(self._calls)
        return out

    def _family_args(self) -> str:
        return self._family.arguments_key if self._family is not None else "arguments"

    def _call_start(self, final: bool) -> tuple[str, int, object, Path | None] | None:
        """Where calls begin in the pending text: (content before, marker length,
        which JSON paths are calls, the content path); the whole text as content
        when no call can begin in it; None while that is not known yet."""
        text, family = self._pending, self._family
        first = not self._begun
        lead = text.lstrip()
        if first and not lead and not final:
            return None  # leading whitespace: what follows decides
        self._begun = True
        if family is None or (family is Family.GENERIC and not first):
            return text, 0, None, None
        if family is Family.GENERIC:  # the whole reply is one JSON object
            return "", 0, (lambda p: len(p) == 2 and p[0] == "tool_calls"), ("content",)
        if family is Family.LLAMA3:  # a call is the whole reply: a bare object
            tag = "<|python_tag|>"
            if first and lead.startswith(tag):
                lead = lead[len(tag) :].lstrip()
            if first and (tag.startswith(lead) or not lead) and not final:
                self._begun = False
                return None
            if first and lead[:1] == "{":
                return "", len(text) - len(lead), (lambda p: p == ()), None
            return text, 0, None, None
        marker = "<tool_call>" if family is Family.HERMES else "[TOOL_CALLS]"
        if family is Family.MISTRAL and first and lead[:1] == "[" and not lead.startswith(marker):
            if marker.startswith(lead) and not final:
                self._begun = False
                return None
            # A bare array of calls: the vocabulary's special marker is not text.
            return "", len(text) - len(lead), (lambda p: len(p) == 1), None
        at = text.find(marker)
        if at < 0:
            keep = 0 if final else _held(text, marker)
            if keep == len(text) and not final:
                return None
            return text[: len(text) - keep], 0, None, None
        is_call = (lambda p: p == ()) if family is Family.HERMES else (lambda p: len(p) == 1)
        return text[:at], len(marker), is_call, None

    def _scan(self) -> ReplyDelta:
        assert self._scanner is not None
        text, self._pending = self._pending, ""
        pieces, content = self._scanner.feed(text)
        taken = len(text)
        if self._scanner.done:
            # What follows the JSON goes back to the pending text.
            taken = self._consumed(text)
            self._pending = text[taken:]
        self._scanned += text[:taken]
        out = ReplyDelta(content=content)
        for p in pieces:
            i = self._base + p.index
            if p.name is not None:
                self._calls.append(_Call(f"call_{uuid.uuid4().hex[:24]}", p.name))
                out.tool_calls.append(CallDelta(i, self._calls[i].id, p.name))
            if p.arguments:
                self._calls[i].arguments += p.arguments
                out.tool_calls.append(CallDelta(i, arguments=p.arguments))
        if self._scanner.done:
            out.add(self._end_scan(complete=True))
        return out

    def _consumed(self, text: str) -> int:
        """How much of ``text`` the scanner read before its JSON ended (scanning
        again, one character at a time, on a copy is simpler than tracking it)."""
        probe = JsonScanner(lambda p: False)
        probe.feed(self._scanned[self._marker_len :])
        for i, ch in enumerate(text):
            probe.feed(ch)
            if probe.done:
                return i + 1
        return len(text)

    def _end_scan(self, complete: bool) -> ReplyDelta:
        """The scanner's JSON ended (or the reply did): calls without a name were
        not calls after all, and their text is content."""
        assert self._scanner is not None
        out = ReplyDelta()
        named = sum(1 for name, _ in self._scanner.calls if name is not None)
        if named == 0 and self._family is not Family.GENERIC:
            out.content = self._scanned
        self._scanner = None
        if complete and self._family is Family.HERMES and named:
            self._after_call = "</tool_call>"
        return out

    def _close_marker(self, final: bool) -> bool:
        """Drops the text up to a call's closing marker; False while it may come."""
        at = self._pending.find(self._after_call)
        if at >= 0:
            self._pending = self._pending[at + len(self._after_call) :]
            self._after_call, self._trim = "", True
            return True
        if final:
            self._pending, self._after_call = "", ""
            return True
        return False
