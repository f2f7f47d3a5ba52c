"""`seedlm export MODEL DIR`: write a registered model as a plain Hugging Face folder, for the servers people
use when one process is not enough (vLLM, TGI, llama.cpp).

MODEL is `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the version the alias points at now is exported),
another MLflow model URI (runs:/...), an MLflow model folder, or an HF model folder. DIR gets config.json,
model.safetensors (an adapter-only LoRA version merged onto its hash-checked base), the tokenizer with its
chat template, generation_config.json (generation stops at <|end|>) and seedlm-export.json (what was
exported). DIR is written in a temporary sibling and swapped in whole; a non-empty DIR is replaced only with
--force. The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from components.serving import deps

RECORD = "seedlm-export.json"
SERVERS = """then serve {dir} with, for example (commands of those projects; not run by seedlm's tests):
  vllm serve {dir} --served-model-name seedlm        (OpenAI-compatible API on :8000)
  docker run -p 8080:80 -v {absdir}:/data ghcr.io/huggingface/text-generation-inference --model-id /data
  python llama.cpp/convert_hf_to_gguf.py {dir} --outfile seedlm.gguf && llama-server -m seedlm.gguf"""


def pinned(ref: str) -> str:
    """models:/NAME@ALIAS as models:/NAME/VERSION of the version it points at now; any other ref as it is."""
    if not ref.startswith("models:/"):
        return ref
    name, version = deps.parse_model_uri(ref)
    return f"models:/{name}/{version}"


def check_target(out: Path, force: bool) -> None:
    """DIR must be absent, an empty folder, or (with --force) a folder to replace."""
    if out.exists() and not out.is_dir():
        raise deps.StageError(f"DIR {out}: exists and is not a folder; choose another DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise deps.StageError(f"DIR {out}: exists and is not empty; pass --force to replace it")


def source_folder(ref: str, resolved: str, tmp: Path, out: Path) -> Path:
    """The local HF folder of MODEL (downloaded and merged under `tmp` when needed)."""
    folder = deps.resolve_model(resolved, tmp)
    if deps.is_uri(resolved):
        return folder
    if not folder.is_dir():
        raise deps.StageError(
            f"MODEL {ref}: no such folder; pass models:/NAME/VERSION, models:/NAME@ALIAS or a model folder"
        )
    if out.resolve() in (folder.resolve(), *folder.resolve().parents):
        raise deps.StageError(f"DIR {out}: is MODEL or holds it; export to another folder")
    return folder


def load(folder: Path, ref: str) -> tuple[Any, Any]:
    """(model, tokenizer) of the HF folder, checked: safetensors weights, a tokenizer with a chat template."""
    from transformers import AutoTokenizer

    what = f"MODEL {ref}"
    if not (folder / "config.json").is_file():
        raise deps.StageError(
            f"{what}: {folder} is not a model folder (no config.json); pass a models:/ URI or an HF folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise deps.StageError(f"{what}: no usable tokenizer in {folder} ({str(e).strip().splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise deps.StageError(f"{what}: the tokenizer has no chat template; rerun preprocess and sft")
    return deps.load_model(folder, what=what, tokenizer=tokenizer), tokenizer


def finish(folder: Path, tokenizer: Any) -> None:
    """Also put the chat template in tokenizer_config.json (transformers 5 writes only chat_template.jinja; some
    converters and servers read the config), and make the files readable to a server in a container."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(tokenizer.chat_template, str) and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def export(ref: str, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write MODEL `ref` to `out` as a plain HF folder; returns what seedlm-export.json records."""
    out = Path(out)
    check_target(out, force)
    resolved = pinned(ref)
    with tempfile.TemporaryDirectory(prefix="seedlm-export-") as tmp:
        model, tokenizer = load(source_folder(ref, resolved, Path(tmp), out), ref)
        record = {
            "model": ref,
            "resolved": resolved,
            "architecture": type(model).__name__,
            "context": int(
                getattr(model.config, "n_positions", 0) or getattr(model.config, "max_position_embeddings", 0)
            ),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with deps.atomic_dir(out) as staging:
            deps.save_model(model, tokenizer, staging)
            finish(staging, tokenizer)
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None, *, prog: str = "python -m components.serving.export", example: str = "") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=(f"example: {example}\n\n" if example else "") + SERVERS.format(dir="DIR", absdir="$PWD/DIR"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION, models:/NAME@ALIAS or a model folder")
    parser.add_argument("dir", metavar="DIR", help="the folder to write (absent or empty, or use --force)")
    parser.add_argument("--force", action="store_true", help="replace DIR when it is not empty")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        record = export(args.model, args.dir, force=args.force)
    except (deps.StageError, MlflowException) as e:
        print(f"seedlm export: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(args.dir).iterdir() if p.is_file()) / 1e6
    print(f"exported {record['resolved']} ({record['architecture']}, {size:.1f} MB) to {args.dir}")
    print(SERVERS.format(dir=args.dir, absdir=Path(args.dir).resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
