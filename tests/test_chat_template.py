"""A model whose file has no chat template (a base model): chats are refused with a
clear error (400 from the server), raw completions work, and a template given to
the engine (`chat_template=`, `--chat-template FILE`) is used."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import tiny_models
import zse
from conftest import REFERENCE_DIR
from serving import ServerProcess

# A minimal template of the ChatML shape, in a form no model file carries.
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    gguf = tmp / "base.gguf"
    tiny_models.write(
        "qwen3", gguf, REFERENCE_DIR / "qwen2-tiny-random-f32.gguf", chat_template=False
    )
    out = tmp / "base.zse"
    zse.convert(gguf, out, progress=False)
    return out


def test_engine_without_a_template_refuses_chats_but_completes_text(base_model: Path) -> None:
    with zse.Engine(base_model) as engine:
        assert engine.metadata["chat_template"] is None
        with pytest.raises(zse.TemplateError, match=r"no chat template.*--chat-template"):
            engine.chat(MESSAGES, max_tokens=2)
        out = engine.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 3


def test_a_given_template_is_used(base_model: Path) -> None:
    with zse.Engine(base_model, chat_template=TEMPLATE) as engine:
        assert engine.apply_chat_template(MESSAGES) == "[user] Hello\n[assistant] "
        assert engine.chat(MESSAGES, max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(zse.TemplateError):
        zse.Engine(base_model, chat_template="{% for %}")


def test_server_answers_400_for_chats_and_serves_completions(base_model: Path) -> None:
    with ServerProcess(base_model, "--max-seqs", "2") as s:
        r = httpx.post(
            s.url("/v1/chat/completions"),
            json={"model": "default", "messages": MESSAGES, "max_tokens": 2},
        )
        assert r.status_code == 400
        assert "no chat template" in r.json()["error"]["message"]
        r = httpx.post(
            s.url("/v1/completions"), json={"model": "default", "prompt": "Hi", "max_tokens": 2}
        )
        assert r.status_code == 200, r.text


def test_server_uses_the_template_file(base_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    with ServerProcess(base_model, "--chat-template", str(template)) as s:
        r = httpx.post(
            s.url("/v1/chat/completions"),
            json={"model": "default", "messages": MESSAGES, "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
    with zse.Engine(base_model) as engine:
        rendered = engine.tokenize("[user] Hello\n[assistant] ")
    assert r.json()["usage"]["prompt_tokens"] == len(rendered)
