"""`zse chat` driven through a pseudo-terminal, as a person types into it."""

from __future__ import annotations

import sys
from pathlib import Path

import pexpect
import zse

PROMPT = "\r\n> "


def test_interactive_chat(default_model: Path, engine: zse.Engine) -> None:
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
        # /reset dropped the story but kept the /system prompt: the answer is the one
        # to that system prompt and this question alone.
        expected = engine.chat(
            [
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            temperature=0,
            max_tokens=300,
        )
        assert child.before.replace("\r\n", "\n").strip() == expected.text.strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
