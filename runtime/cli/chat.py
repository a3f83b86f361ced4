"""`speed chat`: a conversation in the terminal with a running cluster, or with a bundle in this process:
every turn goes out in the model's chat template, the answer streams as it is committed, /reset starts
over, /exit (or Ctrl-D) leaves, and Ctrl-C stops an answer without leaving."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.cli.arguments import (
    add_credential_flags,
    add_sampling_flags,
    add_threads_flag,
    credentials_of,
    number,
    token_count,
)
from runtime.core.chat import ChatMessage
from runtime.core.errors import SpeedError

PROMPT = "> "
HELP = "/reset starts the conversation over, /exit leaves (or Ctrl-D); Ctrl-C stops an answer"

# what sends a conversation and hands each piece of the answer's text to a callback as it comes
Replier = Callable[[list[ChatMessage], Callable[[str], None]], None]


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("chat", help="talk with the model in the terminal, on a cluster or (--bundle) in this "
                                         "process: multi-turn, answers streamed")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT",
                   help="the cluster's coordinator (default 127.0.0.1:50050, as in deploy/local.yaml)")
    p.add_argument("--bundle", type=Path, metavar="DIR", help="chat with this bundle in this process instead")
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=token_count, default=512, help="the longest answer (default 512)")
    p.add_argument("--no-speculation", action="store_true", help="sequential decoding (same text, slower)")
    p.add_argument("--timeout", type=number(0, 86400, above=True), default=600.0, metavar="S",
                   help="on a cluster: give up on an answer after S seconds (default 600)")
    add_sampling_flags(p)
    add_threads_flag(p)
    add_credential_flags(p)
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> None:
    from runtime.core.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, speculative=False if args.no_speculation else None)
    replier, closing = _in_process(args, options) if args.bundle else _on_cluster(args, options)
    try:
        _converse(replier, [ChatMessage("system", args.system)] if args.system else [])
    finally:
        closing()


def _converse(reply: Replier, opening: list[ChatMessage]) -> None:
    try:
        import readline  # noqa: F401 (line editing and history for input() on a terminal)
    except ImportError:
        pass
    print(HELP, file=sys.stderr)
    conversation = list(opening)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr)
            continue
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            conversation = list(opening)
            print("(the conversation starts over)", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"unknown command {command.split()[0]}; {HELP}", file=sys.stderr)
            continue
        if not command:
            continue
        answer: list[str] = []
        try:
            reply([*conversation, ChatMessage("user", line)], _printer(answer))
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except SpeedError as exc:
            if not answer and not any(m.role == "assistant" for m in conversation):
                raise  # the first answer failed: the next would too (no chat template, no cluster)
            print(f"\n(no answer: {exc})", file=sys.stderr)
            continue
        print()
        conversation += [ChatMessage("user", line), ChatMessage("assistant", "".join(answer))]


def _printer(answer: list[str]) -> Callable[[str], None]:
    """Prints each piece of an answer as it comes, and keeps it."""

    def show(text: str) -> None:
        answer.append(text)
        print(text, end="", flush=True)

    return show


def _in_process(args: argparse.Namespace, options) -> tuple[Replier, Callable[[], None]]:
    from runtime.local.reference import LocalDecoder

    decoder = LocalDecoder(args.bundle, threads=args.threads)
    if not decoder.bundle.chat_template:
        raise SpeedError(f"bundle {args.bundle} has no chat template, so it cannot chat; use speed reference for "
                         "plain text, or a chat model's bundle (speed import gguf)")
    local = options.replace(speculative=not args.no_speculation)

    def reply(conversation: list[ChatMessage], show: Callable[[str], None]) -> None:
        decoder.generate("", local, messages=conversation, on_text=show)

    return reply, lambda: None


def _on_cluster(args: argparse.Namespace, options) -> tuple[Replier, Callable[[], None]]:
    from runtime.client import Client

    client = Client(args.coordinator, **credentials_of(args))

    def reply(conversation: list[ChatMessage], show: Callable[[str], None]) -> None:
        stream = client.chat(conversation, options, timeout_s=args.timeout)
        try:
            for chunk in stream:
                show(chunk.text)
        except KeyboardInterrupt:
            stream.cancel()  # the cluster frees the answer's caches now
            raise

    return reply, client.close
