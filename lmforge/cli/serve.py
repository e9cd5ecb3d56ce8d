"""`lmforge serve --checkpoint CKPT`: an OpenAI-compatible HTTP API with streaming and
continuous batching, and a chat page at / (lmforge/serve/)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (loopback only by default)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/"
    )
    parser.add_argument(
        "--model-name", default=None, help="the model id clients see (default: the folder name)"
    )
    parser.add_argument("--slots", type=int, default=16, help="requests decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting; beyond it: 503"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="cap on a request's max_tokens"
    )
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto picks)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for the model's ops (default: torch's choice); fewer leaves cores "
        "for HTTP work and clients on the same machine",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")


def run(args: argparse.Namespace) -> int:
    import logging

    import torch
    import uvicorn

    from lmforge.common import LmforgeError
    from lmforge.hardware import pick_device
    from lmforge.model.gpt import require_causal
    from lmforge.serve.api import Limits, Server, create_app
    from lmforge.serve.batching import BatchEngine
    from lmforge.train.checkpoint import load_plain

    if args.slots < 1 or args.max_queue < 0 or args.max_body_bytes < 1:
        raise LmforgeError("--slots and --max-body-bytes must be >= 1, --max-queue >= 0")
    if args.threads is not None and args.threads < 1:
        raise LmforgeError(f"--threads={args.threads} must be >= 1")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's ops: the engine's loop thread gets `threads`
    model, tokenizer, _ = load_plain(args.checkpoint, merge=True)
    require_causal(model.config, "serve generations")
    if tokenizer is None:
        raise LmforgeError(f"{args.checkpoint} has no tokenizer/ folder, so it cannot serve text")
    model = model.to(pick_device(args.device))
    engine = BatchEngine(model, slots=args.slots, max_queue=args.max_queue, threads=threads)
    name = args.model_name or args.checkpoint.rstrip("/").split("/")[-1]
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens)
    app = create_app(Server(engine, tokenizer, name, limits, args.api_key))
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    print(f"lmforge serve: {name} on http://{args.host}:{args.port} (chat page at /)", flush=True)
    try:  # uvicorn stops taking connections on SIGTERM/SIGINT and lets in-flight ones finish
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown(drain=True, timeout=60)
    return 0
