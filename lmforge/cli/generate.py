"""`lmforge generate`: text from a checkpoint, through the engine (lmforge/engine.py)."""

from __future__ import annotations

import argparse

from lmforge.chat import render_conversation
from lmforge.common import LmforgeError
from lmforge.engine import Engine, SamplingParams
from lmforge.hardware import pick_device
from lmforge.textstream import Detokenizer, StopStrings
from lmforge.tokenizer import END_TURN, Tokenizer
from lmforge.train.checkpoint import load, resolve_checkpoint

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, or a run folder (its latest checkpoint)",
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="tokens to generate (any number: past the context window, the oldest are dropped)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens of a full context kept when generation goes past the model's block_size "
        "(1 to block_size - 1; default 3/4 of block_size; block_size - 1 = nanoGPT's crop)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument(
        "--top-k", type=int, default=200, help="sample among the k most likely tokens (0 = off)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="CTRL penalty on seen tokens (1 = off)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="fix the sampling for reproducible output"
    )
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message in the chat format; print the assistant's answer",
    )
    parser.add_argument("--system", default="", help="--chat: a system message")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop before this text (repeatable)",
    )
    parser.add_argument(
        "--best-of",
        type=int,
        default=1,
        metavar="N",
        help="--chat: sample N answers and print the one --reward scores highest",
    )
    parser.add_argument("--reward", default=None, help="--best-of: a reward model checkpoint")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu) or a torch device"
    )


def encode_prompt(tokenizer: Tokenizer, text: str, vocab_size: int) -> list[int]:
    """Prompt text -> ids; an empty prompt starts from end-of-text when the tokenizer has one."""
    ids = tokenizer.encode(text)
    if not ids and tokenizer.eot_id is not None:
        ids = [tokenizer.eot_id]
    if not ids:
        raise LmforgeError(
            "--prompt is empty and the tokenizer has no end-of-text token to start from"
        )
    if max(ids) >= vocab_size:
        raise LmforgeError(
            f"the prompt has token id {max(ids)} but the model's vocabulary has {vocab_size}: "
            "the checkpoint's tokenizer does not match its model"
        )
    return ids


def run(args: argparse.Namespace) -> int:
    folder = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load(folder, pick_device(args.device))
    if tokenizer is None:
        raise LmforgeError(f"{folder} has no tokenizer/ folder, so --prompt cannot be encoded")
    cfg = model.config
    stop_ids = tokenizer.stop_ids  # end-of-text, plus e.g. Llama 3's <|eot_id|>
    if args.chat:  # the prompt is a user turn; the answer ends at end-of-turn
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = render_conversation(tokenizer, messages, add_generation_prompt=True)[0]
        stop_ids = (tokenizer.tok.token_to_id(END_TURN), *stop_ids)
    else:
        prompt = encode_prompt(tokenizer, args.prompt, cfg.vocab_size)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_ids=stop_ids,
        seed=args.seed,
        window=args.window,
    )
    if args.best_of != 1 or args.reward:
        return best_of(args, model, tokenizer, params)
    engine = Engine(model)
    engine.window(params)  # a bad --window fails before anything is printed
    if not args.chat:
        print(args.prompt, end="", flush=True)
    stops = StopStrings(args.stop)
    detokenizer = Detokenizer(tokenizer)
    tokens = (step[0] for step in engine.stream([prompt], params) if step[0] is not None)
    text = ""
    for token in tokens:
        shown = stops.feed(detokenizer.push(token))
        text += shown
        if args.stream:
            print(shown, end="", flush=True)
        if stops.stopped:
            break
    rest = stops.flush()
    print(rest if args.stream else text + rest)
    return 0


def best_of(args: argparse.Namespace, model, tokenizer: Tokenizer, params: SamplingParams) -> int:
    """--best-of N --reward RM: rejection sampling; the best answer on stdout, every sample's
    reward on stderr."""
    import sys

    from lmforge.recipes.best_of_n import best_of_n, load_reward_model

    if not args.chat or not args.reward or args.stream or args.system:
        raise LmforgeError(
            "--best-of needs --chat and --reward RM_CKPT (and neither --stream nor --system)"
        )
    reward_model = load_reward_model(args.reward, tokenizer)
    choice = best_of_n(model, tokenizer, reward_model, args.prompt, args.best_of, params)
    stops = StopStrings(args.stop)
    print(stops.feed(choice.text) + ("" if stops.stopped else stops.flush()))
    rewards = ", ".join(f"{r:.3f}" for r in choice.rewards)
    print(f"[best of {args.best_of}: reward {choice.reward:.3f}; all: {rewards}]", file=sys.stderr)
    return 0
