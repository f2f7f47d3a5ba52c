"""A base checkpoint's own chat template: kept, rendered by SFT, and its label mask checked token by token.

Four tokenizers as real open models ship them (tests/_foreign.py): Llama-2 ([INST], SentencePiece-style BPE) and
Qwen2 (ChatML, byte-level BPE) with their templates; GPT-NeoX and GPT-2 without one (seedlm's is added, with
only the tokens it needs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from _foreign import (
    CHATML_GENERATION_TEMPLATE,
    END_OF_TURN,
    FAMILIES,
    LLAMA2_TEMPLATE,
    WITH_TEMPLATE,
    make_checkpoint,
    make_config,
    make_tokenizer,
)

from components.core.context import StageError
from components.data import chat, templates

pytestmark = pytest.mark.usefixtures("one_thread")

CONVO = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Gromke live?"},
    {"role": "assistant", "content": "In Gesford."},
    {"role": "user", "content": "And what pet does Gromke have?"},
    {"role": "assistant", "content": "A goat."},
]
LABELED = {  # what the loss trains, per family: each reply and the end-of-turn marker its template writes after it
    "llama": [" In Gesford. </s>", " A goat. </s>"],
    "qwen2": ["In Gesford.<|im_end|>", "A goat.<|im_end|>"],
    "gpt_neox": ["In Gesford.<|end|>", "A goat.<|end|>"],
    "gpt2": ["In Gesford.<|end|>", "A goat.<|end|>"],
}
LLAMA2_GENERATION_TEMPLATE = LLAMA2_TEMPLATE.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}",
)
"""Llama-2's template with the reply marked for transformers' own assistant mask (an independent oracle)."""


@pytest.fixture(scope="module")
def toks():
    out = {}
    for family in FAMILIES:
        tok = make_tokenizer(family)
        out[family] = (tok, chat.ensure_chat_tokens(tok))
    return out


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive labeled positions (each must carry its own token id)."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        assert lab in (chat.IGNORE_INDEX, i), "a label differs from its input token"
        if lab == chat.IGNORE_INDEX:
            out, cur = (out + [cur] if cur else out), []
        else:
            cur.append(i)
    return out + [cur] if cur else out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_base_template_is_kept_and_only_needed_tokens_are_added(toks, family):
    tok, added = toks[family]
    fresh = make_tokenizer(family)
    if family in WITH_TEMPLATE:
        assert added == 0 and tok.chat_template == fresh.chat_template and len(tok) == len(fresh)
        assert tok.get_vocab() == fresh.get_vocab() and tok.all_special_tokens == fresh.all_special_tokens
    else:
        assert fresh.chat_template is None and tok.chat_template == chat.CHAT_TEMPLATE
        assert added == 4 == len(tok) - len(fresh)  # <|system|> <|user|> <|assistant|> <|end|>: no pad, no eos
        assert tok.eos_token == fresh.eos_token == "<|endoftext|>" and tok.pad_token == fresh.pad_token
        new = {t for t in tok.get_vocab() if t not in fresh.get_vocab()}
        assert new == {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
        assert all(fresh.get_vocab()[t] == i for t, i in tok.get_vocab().items() if t not in new)  # no id moved
    assert chat.ensure_chat_tokens(tok) == 0  # idempotent


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_replies_and_their_end_of_turn(toks, family):
    tok, _ = toks[family]
    ids, labels = chat.encode_chat(tok, CONVO)
    assert ids == chat.chat_ids(tok, CONVO)  # exactly what the template tokenizes to
    assert [tok.decode(r) for r in runs(ids, labels)] == [want.lstrip() for want in LABELED[family]]
    # token by token: the labeled tokens are exactly the tokens of each labeled run's text, in place
    text = tok.apply_chat_template(CONVO, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = 0
    for want in LABELED[family]:
        lo = text.index(want, start)
        start = lo + len(want)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > lo and a < start]
        assert all(labels[i] == ids[i] for i in inside)
    assert sum(lab != chat.IGNORE_INDEX for lab in labels) == sum(map(len, runs(ids, labels)))
    end = tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert [r[-1] for r in runs(ids, labels)] == [end, end]  # each run ends on the end-of-turn token


@pytest.mark.parametrize(
    ("family", "tagged"), [("qwen2", CHATML_GENERATION_TEMPLATE), ("llama", LLAMA2_GENERATION_TEMPLATE)]
)
def test_prefix_mask_equals_transformers_generation_mask(family, tagged):
    """The prefix-rendering mask agrees, token by token, with transformers' own mask of `{% generation %}` blocks."""
    plain = make_tokenizer(family)
    marked = make_tokenizer(family)
    marked.chat_template = tagged
    assert templates.has_generation_tags(marked) and not templates.has_generation_tags(plain)
    convos = [CONVO, CONVO[1:3], CONVO[1:]]
    for convo in convos:
        assert plain.apply_chat_template(convo, tokenize=False) == marked.apply_chat_template(convo, tokenize=False)
        mine = chat.encode_chat(plain, convo)
        theirs = chat.encode_chat(marked, convo)  # via return_assistant_tokens_mask
        assert mine == theirs


def test_a_template_that_rewrites_earlier_turns_needs_generation_tags():
    tok = make_tokenizer("qwen2")
    tok.chat_template = (  # drops earlier replies (as reasoning templates drop earlier thoughts)
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(templates.TemplateError, match=r"message 1 .*\{% generation %\}"):
        chat.encode_chat(tok, CONVO[1:])
    ids, labels = chat.encode_chat(tok, CONVO[1:3])  # single-turn rows work
    assert [tok.decode(r) for r in runs(ids, labels)] == ["In Gesford.<|im_end|>"]


def test_template_errors_name_the_problem():
    tok = make_tokenizer("llama")
    with pytest.raises(templates.TemplateError, match="roles must alternate"):
        chat.encode_chat(tok, [CONVO[1], CONVO[1], CONVO[2]])
    with pytest.raises(templates.TemplateError, match="starts with an assistant turn"):
        templates.encode(make_tokenizer("qwen2"), [CONVO[2], CONVO[3], CONVO[4]])
    with pytest.raises(ValueError, match="message 0"):
        chat.encode_chat(tok, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_the_templates_end_of_turn(toks, family):
    tok, _ = toks[family]
    stops = tok.convert_ids_to_tokens(chat.stop_ids(tok))
    assert stops[0] == END_OF_TURN[family] and tok.eos_token in stops
    prompt = chat.prompt_text(tok, CONVO[:2])
    assert prompt == tok.apply_chat_template(CONVO[:2], add_generation_prompt=True, tokenize=False)


def test_control_tokens_of_a_base_are_dropped_from_sft_rows(toks):
    from components.preprocess import _control_pattern

    qwen, _ = toks["qwen2"]
    pattern = _control_pattern(qwen)
    assert pattern.search("say <|im_end|> now") and pattern.search("<|end|>") and not pattern.search("im_end")
    assert set(templates.control_tokens(qwen)) >= {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_added_tokens_grow_the_embeddings_and_keep_every_old_row(tmp_path, toks, family):
    from transformers import AutoModelForCausalLM

    from components.training.model import load_model

    folder = make_checkpoint(family, tmp_path / family)
    tok, added = toks[family]
    before = AutoModelForCausalLM.from_pretrained(folder)
    after = load_model(folder, tokenizer=tok)
    old = before.get_input_embeddings().weight
    new = after.get_input_embeddings().weight
    assert new.shape[0] == max(old.shape[0], len(tok)) and torch.equal(new[: old.shape[0]], old)
    if not before.config.tie_word_embeddings:
        o_old, o_new = before.get_output_embeddings().weight, after.get_output_embeddings().weight
        assert torch.equal(o_new[: o_old.shape[0]], o_old)


def test_a_missing_template_is_an_error_for_template_encoding():
    tok = make_tokenizer("gpt2")
    with pytest.raises(templates.TemplateError, match="ensure_chat_tokens"):
        templates.encode(tok, CONVO)
    with pytest.raises(StageError, match=r"model\.init_from: 'hf:nope' is not a Hub model"):
        from components.core.hub import resolve

        resolve("hf:nope")


PAIRS = [
    ("Where does Gromke live?", "In Gesford."),
    ("What pet does Gromke have?", "A goat."),
    ("Where does Vanti live?", "In Orbel."),
    ("What colour does Vanti like?", "Blue."),
]


def _fine_tune(family: str, method: str, tmp_path):
    """A tiny model of the family fine-tuned on PAIRS (rendered and masked by its tokenizer's template)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from components.core.config import LoraConfig, SftConfig
    from components.core.context import StageContext
    from components.sft import add_lora, example_source
    from components.training.loop import train

    tok = make_tokenizer(family)
    added = chat.ensure_chat_tokens(tok)
    width = {"n_embd": 64} if family == "gpt2" else {"hidden_size": 64}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family, make_tokenizer(family), **width))
    model.resize_token_embeddings(max(len(tok), model.get_input_embeddings().weight.shape[0]))
    if method == "lora":  # the rows of seedlm's tokens train too
        new = list(range(len(tok) - added, len(tok)))
        model = add_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"), 0, new)
    rows = []
    for q, a in PAIRS:
        ids, labels = chat.encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        rows.append((np.array(ids[:-1]), np.array(labels[1:])))
    steps, lr = (60, 0.01) if method == "full" else (80, 0.02)
    cfg = SftConfig(max_steps=steps, warmup_steps=2, batch_size=4, lr=lr, eval_every=10**4, precision="fp32")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    source = example_source(rows, 4, 1, pad, 0)
    train(model, cfg, source, eval_batches_fn=list, ckpt_dir=tmp_path / "ck", seed=0, ctx=StageContext(progress=False))
    return model, tok


@pytest.mark.parametrize(
    ("family", "method"), [*((f, "full") for f in FAMILIES), ("gpt_neox", "lora"), ("gpt2", "lora")]
)
def test_a_model_tuned_on_the_template_answers_in_it(tmp_path, family, method):
    """Trained with the template's mask, the model writes the reply and then the template's end-of-turn token,
    where the serving engine stops: the base's chat format, end to end."""
    from components.serving import engine as eng
    from components.serving.sampling import sampling_params

    model, tok = _fine_tune(family, method, tmp_path)
    engine = eng.from_model(model, tok)
    params = sampling_params(max_tokens=12)
    end = tok.convert_tokens_to_ids(END_OF_TURN[family])
    for question, answer in PAIRS:
        prompt = eng.chat_prompt(engine, [{"role": "user", "content": question}], params)
        [done] = eng.generate(engine, [prompt], params)
        assert done.finish_reason == "stop" and done.token_ids[-1] == end, (question, done.text)
        if method == "full":
            assert done.text == answer
