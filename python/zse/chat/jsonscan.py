"""An incremental JSON scanner for tool calls as they are generated: it finds, in
text that arrives a few characters at a time, each call object's ``name`` and the
raw text of its arguments, and a top-level ``content`` string, so a stream can
send them on before the JSON is complete."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Path = tuple[str | int, ...]

#: The end of a JSON string's text that may be the start of an escape.
_PARTIAL_ESCAPE = re.compile(
    r"\\(u[0-9a-fA-F]{0,3})?$|\\u[dD][89abAB][0-9a-fA-F]{2}(\\u?[0-9a-fA-F]{0,3})?$"
)


@dataclass
class CallPiece:
    """What one call gained: its name once known, then arguments text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class _Frame:
    kind: str  # "{" or "["
    path: Path
    key: str | None = None  # the object member being read
    index: int = 0  # the array item being read
    expect_key: bool = True


@dataclass
class _Call:
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    sent_name: bool = False
    sent_args: int = 0  # characters of arguments already sent


class JsonScanner:
    """Scans one JSON value. ``is_call(path)`` says which objects are calls;
    ``args_keys`` name their arguments member; a string at ``content_path`` is
    decoded as it arrives. ``feed`` returns what calls and content gained."""

    def __init__(
        self,
        is_call: Callable[[Path], bool],
        args_keys: tuple[str, ...] = ("arguments", "parameters"),
        content_path: Path | None = None,
    ) -> None:
        self._is_call = is_call
        self._args_keys = args_keys
        self._content_path = content_path
        self._stack: list[_Frame] = []
        self._calls: list[_Call] = []
        self._call_depth: list[int] = []  # stack depth of each open call object
        self._string: list[str] | None = None  # raw text of the string being read
        self._string_path: Path = ()
        self._escape = False
        self._scalar: list[str] | None = None
        self._args_depth: int | None = None  # stack depth where the arguments began
        self._content_sent = 0
        self._args_closed_here = False
        self.done = False
        self.started = False

    @property
    def calls(self) -> list[tuple[str | None, str]]:
        return [(c.name, "".join(c.arguments)) for c in self._calls]

    def _path_of_value(self) -> Path:
        if not self._stack:
            return ()
        top = self._stack[-1]
        return (*top.path, top.key if top.kind == "{" else top.index)  # type: ignore[arg-type]

    def _in_args(self) -> bool:
        return self._args_depth is not None

    def feed(self, text: str) -> tuple[list[CallPiece], str]:
        content: list[str] = []
        for ch in text:
            if self.done:
                break
            self._args_closed_here = False
            self._char(ch)
            if (self._in_args() or self._args_closed_here) and self._calls:
                self._calls[-1].arguments.append(ch)
            if self._string is not None and self._string_path == self._content_path:
                content.append(self._content_delta())
        pieces = self._pieces()
        return pieces, "".join(content)

    def _content_delta(self) -> str:
        raw = "".join(self._string or [])
        safe = _PARTIAL_ESCAPE.sub("", raw)
        try:
            decoded: str = json.loads(f'"{safe}"')
        except ValueError:
            return ""
        out = decoded[self._content_sent :]
        self._content_sent = len(decoded)
        return out

    def _pieces(self) -> list[CallPiece]:
        out = []
        for i, c in enumerate(self._calls):
            if c.name is None:
                continue  # arguments wait for the name
            piece = CallPiece(i)
            if not c.sent_name:
                piece.name = c.name
                c.sent_name = True
            args = "".join(c.arguments)
            if len(args) > c.sent_args:
                piece.arguments = args[c.sent_args :]
                c.sent_args = len(args)
            if piece.name is not None or piece.arguments:
                out.append(piece)
        return out

    # The character machine -------------------------------------------------------

    def _char(self, ch: str) -> None:
        if self._string is not None:
            self._string_char(ch)
            return
        if self._scalar is not None:
            if ch.isalnum() or ch in "+-.":
                self._scalar.append(ch)
                return
            self._scalar = None
            self._value_done(closed_by_this=False)
        if ch in " \t\r\n":
            return
        self.started = True
        top = self._stack[-1] if self._stack else None
        if top is not None and top.kind == "{" and top.expect_key:
            if ch == '"':
                self._begin_string(key=True)
            elif ch == "}":
                self._close()
            return
        if ch == ":" or (ch == "," and top is not None):
            if ch == "," and top is not None:
                if top.kind == "{":
                    top.expect_key = True
                else:
                    top.index += 1
            return
        if ch in "]}":
            self._close()
            return
        self._begin_value(ch)

    def _begin_value(self, ch: str) -> None:
        path = self._path_of_value()
        if (
            self._call_depth
            and self._call_depth[-1] == len(self._stack)
            and self._stack[-1].key in self._args_keys
        ):
            self._args_depth = len(self._stack)
        if ch in "{[":
            self._stack.append(_Frame(ch, path))
            if ch == "{" and self._is_call(path):
                self._calls.append(_Call())
                self._call_depth.append(len(self._stack))
        elif ch == '"':
            self._begin_string(key=False)
        else:
            self._scalar = [ch]

    def _begin_string(self, key: bool) -> None:
        self._string = []
        self._escape = False
        self._string_path = ("<key>",) if key else self._path_of_value()
        if self._string_path == self._content_path:
            self._content_sent = 0

    def _string_char(self, ch: str) -> None:
        assert self._string is not None
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            raw = "".join(self._string)
            self._string = None
            try:
                text = json.loads(f'"{raw}"')
            except ValueError:
                text = raw
            if self._string_path == ("<key>",):
                top = self._stack[-1]
                top.key = text
                top.expect_key = False
                return
            if (
                self._call_depth
                and len(self._stack) == self._call_depth[-1]
                and self._stack[-1].key == "name"
            ):
                self._calls[-1].name = text
            self._value_done(closed_by_this=True)
            return
        self._string.append(ch)

    def _close(self) -> None:
        if not self._stack:
            self.done = True
            return
        depth = len(self._stack)
        self._stack.pop()
        if self._call_depth and self._call_depth[-1] == depth:
            self._call_depth.pop()
        self._value_done(closed_by_this=True)

    def _value_done(self, closed_by_this: bool) -> None:
        """A value ended (its last character the one just read, or, for a number or
        a literal, the one before): maybe the arguments, maybe the whole text."""
        if self._args_depth is not None and len(self._stack) == self._args_depth:
            self._args_depth = None
            self._args_closed_here = closed_by_this
        if not self._stack:
            self.done = True
