"""`zse chat` driven through a pseudo-terminal, as a person types into it."""

from __future__ import annotations

import sys
from pathlib import Path

import pexpect

PROMPT = "\r\n> "


def test_interactive_chat(default_model: Path) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "zse", "chat", str(default_model), "--max-tokens", "300", "--temperature", "0"],
        encoding="utf-8",
        timeout=60,
        env={"PYTHONUNBUFFERED": "1", "TERM": "dumb"},
    )
    try:
        child.expect("/exit")
        child.expect("> ")
        # Ctrl-C at the prompt gives a fresh prompt, not an exit.
        child.sendintr()
        child.expect("> ")
        # An answer streams in; Ctrl-C stops it and the chat goes on.
        child.sendline("Write a long story about a dragon who loves to bake bread.")
        child.expect("bread.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # a few words of the answer have streamed
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("> ")
        # The conversation is kept; /system and /reset are commands, not messages.
        child.sendline("/system You answer in one word.")
        child.expect("> ")
        child.sendline("/reset")
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect("France\\?\r\n")
        child.expect(PROMPT)
        answer = child.before
        assert answer.strip() and "[stopped]" not in answer
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
