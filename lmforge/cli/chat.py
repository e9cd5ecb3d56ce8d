"""`lmforge chat --checkpoint CKPT`: talk to a model in the terminal. Answers stream as they
are generated; the conversation is kept (the oldest exchanges are dropped when it outgrows
the context); line editing and input history come from readline. Commands: /reset (a new
conversation), /temp T (sampling temperature; 0 = greedy), /help, /quit (or Ctrl-D).
Ctrl-C stops an answer midway."""

from __future__ import annotations

import argparse
import contextlib
import sys

HELP = "commands: /reset  /temp T  /help  /quit"


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    parser.add_argument("--system", default="", help="a system message to start with")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer (default: half the context)",
    )
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto picks)")


def run(args: argparse.Namespace) -> int:
    from lmforge.common import LmforgeError
    from lmforge.hardware import pick_device
    from lmforge.train.checkpoint import load_plain

    model, tokenizer, _ = load_plain(args.checkpoint, merge=True)
    if tokenizer is None:
        raise LmforgeError(f"{args.checkpoint} has no tokenizer/ folder, so it cannot chat")
    if args.max_new_tokens is None:
        args.max_new_tokens = model.config.block_size // 2
    if not 1 <= args.max_new_tokens < model.config.block_size:
        raise LmforgeError(
            f"--max-new-tokens must be between 1 and {model.config.block_size - 1} "
            "(the model's context, less room for the conversation)"
        )
    model = model.to(pick_device(args.device))
    with contextlib.suppress(ImportError):  # line editing and history for input()
        import readline  # noqa: F401
    Session(model, tokenizer, args).loop()
    return 0


class Session:
    def __init__(self, model, tokenizer, args: argparse.Namespace):
        from lmforge.engine import Engine

        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.engine = Engine(model, pad_id=tokenizer.pad_id or 0)
        self.temperature = args.temperature
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = (
            [{"role": "system", "content": self.args.system}] if self.args.system else []
        )

    def loop(self) -> None:
        print(f"lmforge chat ({HELP})", flush=True)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.messages.append({"role": "user", "content": line})
            answer = self.answer()
            self.messages.append({"role": "assistant", "content": answer})

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        name, _, value = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.reset()
            print("(new conversation)", flush=True)
        elif name == "/temp":
            try:
                temperature = float(value)
                if temperature < 0:
                    raise ValueError
                self.temperature = temperature
                print(f"(temperature {temperature})", flush=True)
            except ValueError:
                print("(usage: /temp T, with T >= 0; 0 = greedy)", flush=True)
        else:
            print(f"({HELP})", flush=True)
        return True

    def answer(self) -> str:
        """Stream the assistant's answer to the conversation so far; return its text."""
        from lmforge.chat import chat_prompt
        from lmforge.engine import SamplingParams
        from lmforge.textstream import Detokenizer, StopStrings

        args, block = self.args, self.model.config.block_size
        prompt = chat_prompt(self.tokenizer, self.messages, block - args.max_new_tokens)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=self.temperature,
            top_k=args.top_k or None,
            stop_ids=prompt.stop_ids,
            seed=args.seed,
        )
        detokenizer, stops = Detokenizer(self.tokenizer), StopStrings(prompt.stop_strings)
        text = ""
        sys.stdout.write("model> ")
        try:
            for step in self.engine.stream([prompt.ids], params):
                if step[0] is None:
                    break
                piece = stops.feed(detokenizer.push(step[0]))
                text += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
                if stops.stopped:
                    break
        except KeyboardInterrupt:
            sys.stdout.write(" (stopped)")
        if not stops.stopped:
            rest = stops.flush()
            text += rest
            sys.stdout.write(rest)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return text.strip()
