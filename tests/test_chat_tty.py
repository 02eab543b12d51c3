"""`zse chat` driven through a pseudo-terminal, as a person types into it."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pexpect
import zse

PROMPT = "\r\n> "
# Long enough that the story is still streaming when Ctrl-C arrives, even on a loaded
# machine (the model writes to the limit: it does not end the story by itself).
MAX_TOKENS = "1000"


def wait_until_reading(child: pexpect.spawn) -> None:
    """Returns once the chat's main thread sleeps after printing its prompt, that is in
    readline's wait for a key, where a person's Ctrl-C lands.

    pexpect sees the prompt the moment it is written, before the chat calls select();
    CPython's readline loop acts on a SIGINT that comes in that gap only at the next
    key, so a Ctrl-C sent at once could be held back on a busy machine."""
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            # The state follows the parenthesised command name.
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # no /proc here: nothing to wait on
        if state == "S":
            return
        time.sleep(0.005)
    raise AssertionError("the chat never waited for input after its prompt")


def _as_from_a_shell() -> None:
    """The chat's signals as a shell at a terminal starts it: Ctrl-C delivered. A
    test run started in the background (``cmd &`` in a script) ignores SIGINT, and a
    child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interactive_chat(default_model: Path, engine: zse.Engine) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "zse", "chat", str(default_model), "--max-tokens", MAX_TOKENS, "--temperature", "0"],
        encoding="utf-8",
        timeout=60,
        env={"PYTHONUNBUFFERED": "1", "TERM": "dumb"},
        preexec_fn=_as_from_a_shell,
    )
    try:
        child.expect("/exit")
        child.expect("> ")
        # Ctrl-C at the prompt gives a fresh prompt, not an exit.
        wait_until_reading(child)
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
            max_tokens=int(MAX_TOKENS),
        )
        assert child.before.replace("\r\n", "\n").strip() == expected.text.strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
