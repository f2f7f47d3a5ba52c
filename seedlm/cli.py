"""The `seedlm` command: one entry point for everything a user runs.

Each subcommand hands its arguments to the module that owns it (`seedlm SUBCOMMAND --help` shows its
options); `python -m components.<stage>` stays for dvc.yaml. Imports happen only for the subcommand used,
so `seedlm --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str
    """module:function called with (argv, prog); a stage name is passed first for `stage`."""
    help: str
    example: str


COMMANDS: dict[str, Command] = {
    "run": Command(
        "flows.pipeline:main",
        "run the pipeline as a Prefect flow (only the stages whose inputs changed)",
        "seedlm run --force sft -S sft.lr=3e-4",
    ),
    "stage": Command(
        "components.core.runner:cli",
        "run one stage, as dvc.yaml does",
        "seedlm stage pretrain -S pretrain.max_steps=50",
    ),
    "eval": Command(
        "components.evaluate:main",
        "evaluate registered models or model folders on the held-out sets",
        "seedlm eval --model models:/seedlm@champion --model mine=/path/to/hf_folder",
    ),
    "lineage": Command(
        "components.registry.lineage:main",
        "how a registered version was made, and what differs from the champion",
        "seedlm lineage models:/seedlm/3",
    ),
    "chat": Command(
        "components.serving.terminal:main",
        "chat with a model in the terminal (streams tokens)",
        "seedlm chat models:/seedlm@champion   |   echo 'Where does Hustum live?' | seedlm chat",
    ),
    "serve": Command(
        "components.serving.server:main",
        "OpenAI-compatible HTTP API and a web chat page",
        "seedlm serve --port 8000   (then open http://127.0.0.1:8000/)",
    ),
    "export": Command(
        "components.serving.export:main",
        "write a registered model as a plain HF folder "
        "(merged LoRA, safetensors, tokenizer and chat template) for vLLM, TGI or llama.cpp",
        "seedlm export models:/seedlm@champion exported/",
    ),
    "deploy": Command(
        "flows.deploy:main",
        "create the scheduled Prefect deployments from params.yaml",
        "seedlm deploy --env MLFLOW_TRACKING_URI=http://127.0.0.1:5000 --automations",
    ),
    "replay": Command(
        "components.tracking.backlog:replay_main",
        "send tracking data saved while the MLflow server was away",
        "seedlm replay   (or: seedlm replay .seedlm/tracking-backlog/RUN.jsonl)",
    ),
}


def _parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<8} {c.help}\n  {'':<8}   e.g. {c.example}" for name, c in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="seedlm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Grow your own language model from your own data: ingest -> preprocess -> pretrain -> sft -> "
        "evaluate -> register, then chat with it.",
        epilog="commands:\n" + "\n".join(lines) + "\n\n`seedlm COMMAND --help` shows a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _resolve(target: str) -> Callable[..., int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[args.command]
    return int(_resolve(command.target)(args.args, prog=f"seedlm {args.command}", example=command.example) or 0)
