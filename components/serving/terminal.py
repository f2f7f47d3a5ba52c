"""`seedlm chat [MODEL]`: talk to a model in the terminal; answers stream as they are generated.

MODEL is a `models:/` URI or a model folder (default `models:/seedlm@champion`). The conversation is
kept until `/reset`; `/system TEXT` sets the system message (empty: none), `/params k=v ...` changes
sampling settings (no arguments: show them), `/quit` or Ctrl-D leaves. Ctrl-C stops the answer being
written, not the program. With a retrieval index (--index DIR, the one the registered version carries, or the
pipeline's for a model folder) each question is answered from the passages retrieved for it, and their sources
are listed after the answer (on stderr); `--no-rag` or `/rag off` answers without. With stdin not a terminal
(`echo "question" | seedlm chat`) each input line is one turn of the same conversation: the answers are
printed, one per line, and the program exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from components.retrieval.search import open_index
from components.serving import deps
from components.serving.engine import Engine, chat_prompt, load_engine, make_row, run_rows
from components.serving.rag import cli_index, ground, rag_arguments
from components.serving.sampling import FIELDS, ParamError, SamplingParams, sampling_params

DEFAULT_MODEL = "models:/seedlm@champion"
HELP = "commands: /reset  /system TEXT  /params k=v ...  /rag on|off  /quit   (Ctrl-C stops an answer, Ctrl-D leaves)"


@dataclass
class Chat:
    """A conversation with one engine: history, system message and sampling settings."""

    engine: Engine
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    index: Path | None = None
    """The retrieval index grounding the answers (None: none)."""
    rag: bool = True
    """Whether answers retrieve from `index` (/rag on|off)."""

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history


def parse_params(params: SamplingParams, items: list[str]) -> SamplingParams:
    """Apply `k=v` items (v read as JSON when it parses: 0.7, 5, ["a","b"]; else as a string; null resets)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ParamError(item, f"{item!r}: expected key=value, e.g. temperature=0.7")
        try:
            values[key.strip()] = json.loads(raw)
        except ValueError:
            values[key.strip()] = raw
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ParamError(unknown[0], f"unknown setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    resets = {k: getattr(SamplingParams(), k) for k, v in values.items() if v is None}
    return sampling_params(replace(params, **resets), **{k: v for k, v in values.items() if v is not None})


def ask(chat: Chat, text: str, out: TextIO, err: TextIO) -> str | None:
    """One user turn: stream the answer to `out` and keep both in the history. Ctrl-C stops the answer."""
    chat.history.append({"role": "user", "content": text})
    found: list[dict[str, Any]] = []
    try:
        messages = chat.messages()
        if chat.rag and chat.index is not None:  # passages go into this turn only: the history keeps the question
            messages, found = ground(chat.engine, chat.index, messages, chat.params)
        prompt = chat_prompt(chat.engine, messages, chat.params)
    except ParamError as e:
        chat.history.pop()
        print(f"error: {e}", file=err)
        return None
    if prompt.trimmed:
        print(f"(the {prompt.trimmed} oldest messages no longer fit the context and were left out)", file=err)

    def emit(row: Any, delta: str, finish: str | None) -> None:
        out.write(delta)
        out.flush()

    row = make_row(chat.engine, prompt, chat.params, emit=emit)
    try:
        run_rows(chat.engine, [row])
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=err, flush=True)
    out.write("\n")
    out.flush()
    for src in found:
        text = " ".join(src["text"].split())
        print(
            f"  [{src['n']}] {src['source']} ({src['location']}): {text[:72]}{'…' if len(text) > 72 else ''}", file=err
        )
    chat.history.append({"role": "assistant", "content": row.stream.final})
    return row.stream.final


def command(chat: Chat, line: str, err: TextIO) -> bool:
    """Run a /command; False means quit."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        chat.history.clear()
        print("(new conversation)", file=err)
    elif name == "/system":
        chat.system = arg.strip()
        print(f"(system message {'set' if chat.system else 'removed'})", file=err)
    elif name == "/rag" and arg.strip() in ("on", "off") and (chat.index is not None or arg.strip() == "off"):
        chat.rag = arg.strip() == "on"
        print(f"(retrieval {arg.strip()})", file=err)
    elif name == "/rag":
        state = "no index (--index DIR)" if chat.index is None else f"{'on' if chat.rag else 'off'}, {chat.index}"
        print(f"(retrieval: {state}; /rag on|off)", file=err)
    elif name == "/params":
        try:
            chat.params = parse_params(chat.params, arg.split())
        except ParamError as e:
            print(f"error: {e}", file=err)
        print(" ".join(f"{k}={json.dumps(v)}" for k, v in asdict(chat.params).items()), file=err)
    else:
        print(f"unknown command {name}; {HELP}", file=err)
    return True


def _read(interactive: bool, inp: TextIO, err: TextIO) -> str | None:
    """The next input line (None at end of input); Ctrl-C at the prompt only clears it."""
    if not interactive:
        line = inp.readline()
        return line.rstrip("\n") if line else None
    while True:
        try:
            return input("you> ")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=err)


def loop(chat: Chat, inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Read turns from `inp` until /quit or its end (default: the process's stdin, stdout, stderr)."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = inp.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        print(f"seedlm chat with {chat.engine.label} (context {chat.engine.context} tokens). {HELP}", file=err)
    while (line := _read(interactive, inp, err)) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(chat, line, err):
                return
            continue
        if interactive:
            print("bot> ", end="", file=err, flush=True)
        ask(chat, line, out, err)


def main(
    argv: list[str] | None = None, *, prog: str = "python -m components.serving.terminal", example: str = ""
) -> int:
    """`seedlm chat` (the seedlm CLI passes its prog and example); returns the exit status."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=f"{HELP}\nexample: {example}" if example else HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help="models:/ URI or model folder (default: %(default)s)"
    )
    p.add_argument("--system", default="", help="system message")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="sampling setting, e.g. -p temperature=0.7 -p max_tokens=64 (as /params)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small models)")
    p.add_argument("--rag", action="store_true", help="require a retrieval index (on whenever there is one)")
    rag_arguments(p)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        params = parse_params(SamplingParams(), args.param)
        given, fallback = cli_index(args)
        given = open_index(given).folder if given is not None else None  # a bad --index fails before the model loads
        engine = load_engine(args.model)
        chat = Chat(engine, params, args.system, index=None if args.no_rag else given or engine.index or fallback)
        if args.rag and chat.index is None:
            raise deps.StageError("--rag: no retrieval index: build one (`dvc repro index`) or pass --index DIR")
    except (deps.StageError, ParamError) as e:
        print(f"seedlm chat: {e}", file=sys.stderr)
        return 2
    loop(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
