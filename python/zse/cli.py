"""The ``zse`` command: ``pull``, ``convert``, ``info`` and ``chat``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import _core
from .convert import convert, inspect
from .models import pull


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _model_path(arg: str | None) -> Path:
    """A model argument: a `.zse` path, or nothing for the default model."""
    return Path(arg) if arg else pull()


def cmd_pull(args: argparse.Namespace) -> int:
    path = pull(force=args.force)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    report = convert(args.src, args.out, quant=args.quant)
    print(
        f"wrote {report['output']} ({report['tensors']} tensors, "
        f"{_fmt_bytes(report['bytes'])}, {report['quantization']})"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = inspect(_model_path(args.model))
    c = info["config"]
    rows: list[tuple[str, Any]] = [
        ("name", info["name"]),
        ("architecture", c["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("layers", c["num_layers"]),
        ("hidden size", c["hidden_size"]),
        ("heads", f"{c['num_heads']} (KV heads {c['num_kv_heads']}, head dim {c['head_dim']})"),
        ("context length", c["context_length"]),
        ("vocabulary", c["vocab_size"]),
        ("quantization", info["quantization"]),
        ("file size", _fmt_bytes(info["file_size"])),
        ("tokenizer", f"{info['tokenizer']['type']}, {info['tokenizer']['vocab_size']} tokens"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        (
            "source",
            f"{info['source']['source_name']} (sha256 {info['source']['source_sha256'][:16]})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("tensors:")
    for t in info["tensor_types"]:
        print(f"  {t['kind']:<{width}}  {t['dtype']:<5} x{t['count']}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .engine import Engine

    engine = Engine(_model_path(args.model))
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        parts: list[str] = []
        with engine.stream(history, **sampling) as stream:
            try:
                for delta in stream:
                    parts.append(delta)
                    print(delta, end="", flush=True)
            except KeyboardInterrupt:
                stream.close()
                print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(parts)})

    if args.message is not None:
        answer(args.message)
        return 0
    print(
        f"{engine.model_name}: /reset clears the chat, /system TEXT sets the system prompt, "
        "/exit leaves. Ctrl-C stops an answer."
    )
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history = [m for m in history if m["role"] == "system"]
            continue
        if line.startswith("/system"):
            history = [{"role": "system", "content": line[len("/system") :].strip()}]
            continue
        answer(line)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zse", description="Serve an LLM from one file.")
    p.add_argument("--version", action="version", version=f"zse {_core.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pull", help="fetch the default model into the cache")
    s.add_argument("--force", action="store_true", help="download and convert again")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("convert", help="convert a GGUF file or HF directory to .zse")
    s.add_argument("src", help="a .gguf file or a HF model directory")
    s.add_argument("out", help="the .zse file to write")
    s.add_argument(
        "--quant",
        choices=["int4", "int8", "fp16", "keep", "q4_0", "q4_1", "q4_k", "q8_0"],
        default="int4",
        help="weight precision (default int4; keep = the source's block types)",
    )
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("info", help="show what is inside a .zse file")
    s.add_argument("model", nargs="?", help="a .zse file (default: the default model)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("chat", help="chat with a model in the terminal")
    s.add_argument("model", nargs="?", help="a .zse file (default: the default model)")
    s.add_argument("-m", "--message", help="answer this one message and exit")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--seed", type=int)
    s.set_defaults(func=cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, _core.ZseError, RuntimeError) as e:
        print(f"zse: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
