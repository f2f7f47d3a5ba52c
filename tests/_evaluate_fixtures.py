"""The tiny world of the test_evaluate* files: a tokenizer, processed data and GPT-2 models small enough to
fit in seconds, and the evaluate settings they run with. conftest.py builds it once per session (`tiny`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.core.config import EvaluateConfig  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NAMES = ["Zorb", "Quill", "Mavo", "Tessa", "Brim", "Kalo", "Fenn", "Orra", "Pim", "Vex", "Luma", "Drax"]
COLORS = ["red", "blue", "green", "amber"]
FOLLOW_UP = "<|user|>\nthanks a lot<|end|>\n"
"""Trained after each answer: what the fitted model goes on to say when generation does not stop."""


# ---------------------------------------------------------------- tiny world helpers
def world() -> list[tuple[list[dict], str, str]]:
    """(prompt messages, reference, task) items: colour questions, facts (longer answers), yes/no questions."""
    items = []
    for i, name in enumerate(NAMES):
        color = COLORS[i % len(COLORS)]
        items.append(([{"role": "user", "content": f"What color is {name}?"}], color, "qa"))
        items.append(
            ([{"role": "user", "content": f"Tell me about {name}."}], f"{name} is {color}, like {name}.", "fact")
        )
        asked = COLORS[(i + i // 2) % len(COLORS)]
        items.append(
            (
                [
                    {"role": "system", "content": "Answer yes or no."},
                    {"role": "user", "content": f"Is {name} {asked}?"},
                ],
                "yes" if asked == color else "no",
                "yesno",
            )
        )
    return items


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            min_frequency=1,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        extra_special_tokens=SPECIALS[2:],
    )
    tok.chat_template = TEMPLATE
    return tok


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 except the last assistant content + <|end|>)."""
    prompt = tok(
        tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    answer = tok(messages[-1]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
    tail = tok("\n", add_special_tokens=False)["input_ids"]
    return prompt + answer + tail, [-100] * len(prompt) + answer + [-100] * len(tail)


def make_processed(root: Path, tok, items) -> Path:
    import datasets

    out = root / "processed"
    tok.save_pretrained(out / "tokenizer")
    docs = [f"The color of {n} is {COLORS[i % len(COLORS)]}." for i, n in enumerate(NAMES)] * 3
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    np.asarray(ids, dtype=np.uint16).tofile(out / "val.bin")
    cols = {"input_ids": [], "labels": [], "prompt": [], "reference": [], "task": []}
    for prompt, ref, task in items:
        ids_, labels = encode_chat(tok, prompt + [{"role": "assistant", "content": ref}])
        for key, value in zip(cols, (ids_, labels, json.dumps(prompt), ref, task)):
            cols[key].append(value)
    datasets.Dataset.from_dict(cols).save_to_disk(str(out / "sft_test"))
    (out / "seedlm.json").write_text(json.dumps({"stage": "preprocess", "result": {"dtype": "uint16"}}))
    return out


def make_model(folder: Path, tok, items=(), steps: int = 0, seed: int = 0):
    """A tiny GPT-2 saved with save_pretrained; with `steps`, fitted on the items' conversations."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    if steps:
        seqs = [
            tok(
                tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) + FOLLOW_UP,
                add_special_tokens=False,
            )["input_ids"]
            for p, r, _ in items
        ]
        width = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to a busy machine
        try:
            for _ in range(steps):
                loss = model(input_ids=x, labels=y).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def build_tiny(root: Path) -> dict:
    """The world in `root`: tokenizer, processed data, an unfitted (pretrain) and a fitted (sft) model."""
    items = world()
    texts = (
        [f"{m['content']}" for p, r, _ in items for m in p]
        + [r for _, r, _ in items]
        + [f"The color of {n} is {c}." for n in NAMES for c in COLORS]
    )
    tok = make_tokenizer(texts)
    processed = make_processed(root, tok, items)
    make_model(root / "pretrain", tok, seed=1)
    make_model(root / "sft", tok, items, steps=60, seed=2)
    (root / "plots").mkdir()
    (root / "plots" / "pretrain_loss.csv").write_text("step,train_loss,val_loss,lr\n1,5.0,,0.001\n2,4.0,4.2,0.001\n")
    return {
        "root": root,
        "tok": tok,
        "items": items,
        "processed": processed,
        "models": {"pretrain": root / "pretrain", "sft": root / "sft"},
    }


def cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(
        **{"max_new_tokens": 8, "batch_size": 8, "ppl_batches": 2, "bootstrap": 200, "num_samples": 5, **kw}
    )


def run_eval(tiny, out: str, **kw):
    from components.evaluate import evaluate_models

    root = tiny["root"]
    return evaluate_models(
        cfg(**kw),
        tiny["processed"],
        tiny["models"],
        root / out,
        root / f"{out}-metrics.json",
        root / "plots" / f"{out}-plot.json",
        seed=7,
        plots_dir=root / "plots",
    )
