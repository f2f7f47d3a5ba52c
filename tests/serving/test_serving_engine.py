"""The generation engine: parity with transformers' generate, batching, sampling, trimming, stops, streaming text."""

from __future__ import annotations

import pytest
import torch
from _evaluate_fixtures import COLORS
from _serving_fixtures import QUESTIONS, ask

from components.serving.detok import TextStream
from components.serving.engine import (
    Prompt,
    chat_prompt,
    generate,
    generate_texts,
    make_row,
    run_rows,
    text_prompt,
)
from components.serving.sampling import ParamError, SamplingParams, sampling_params

GREEDY = SamplingParams(max_tokens=12)


def hf_greedy(engine, ids: list[int], max_new: int, **kw) -> list[int]:
    """transformers' own greedy decoding of one prompt, up to and including the first stop token."""
    x = torch.tensor([ids])
    out = engine.model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=engine.pad_id,
        **kw,
    )
    new = out[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in engine.stop_ids), None)
    return new if cut is None else new[: cut + 1]


def test_greedy_equals_hf_generate_token_for_token(engine):
    prompts = [chat_prompt(engine, ask(q), GREEDY) for q in QUESTIONS]
    answers = generate(engine, prompts, GREEDY, max_batch=3)  # 3 at a time: the 4th joins mid-way
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.token_ids == hf_greedy(engine, prompt.ids, GREEDY.max_tokens)
    assert answers[0].text in COLORS and answers[0].finish_reason == "stop"  # the fitted model answers a colour
    assert answers[0].token_ids[-1] in engine.stop_ids and answers[0].completion_tokens == len(answers[0].token_ids)


def test_repetition_penalty_matches_hf(engine):
    params = sampling_params(GREEDY, repetition_penalty=1.6)
    prompt = chat_prompt(engine, ask(QUESTIONS[2]), params)
    [answer] = generate(engine, [prompt], params)
    assert answer.token_ids == hf_greedy(engine, prompt.ids, GREEDY.max_tokens, repetition_penalty=1.6)


def test_batched_rows_equal_unbatched_rows_with_mixed_settings(engine):
    settings = [
        GREEDY,
        sampling_params(GREEDY, temperature=1.3, seed=4),
        sampling_params(GREEDY, temperature=0.8, top_k=5, top_p=0.9, seed=7, repetition_penalty=1.2),
        sampling_params(GREEDY, temperature=1.0, seed=11, max_tokens=5),
    ]
    convos = [
        ask(QUESTIONS[0]),
        [{"role": "system", "content": "Answer yes or no."}, *ask("Is Zorb red?")],
        ask(QUESTIONS[2]),
        ask(QUESTIONS[3]),
    ]
    prompts = [chat_prompt(engine, c, s) for c, s in zip(convos, settings, strict=True)]
    together = generate(engine, prompts, settings, max_batch=2)
    alone = [generate(engine, [p], s)[0] for p, s in zip(prompts, settings, strict=True)]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert together[3].completion_tokens <= 5


def test_seeded_sampling_is_reproducible(engine):
    prompt = chat_prompt(engine, ask(QUESTIONS[2]), GREEDY)
    hot = [sampling_params(GREEDY, temperature=2.0, seed=s) for s in (1, 1, 2, 3, 4)]
    out = [a.token_ids for a in generate(engine, [prompt] * 5, hot)]
    assert out[0] == out[1]
    assert len({tuple(o) for o in out}) > 1  # other seeds sample other answers
    # top_k=1 leaves one candidate: sampling then is greedy
    [one] = generate(engine, [prompt], sampling_params(GREEDY, temperature=1.5, top_k=1, seed=9))
    assert one.token_ids == generate(engine, [prompt], GREEDY)[0].token_ids


def test_long_conversations_lose_oldest_turns_but_keep_the_system_message(engine):
    system = {"role": "system", "content": "Answer briefly."}
    turns = []
    for q in QUESTIONS * 3:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": "red, like Zorb is red."}]
    messages = [system, *turns, {"role": "user", "content": "What color is Zorb?"}]
    prompt = chat_prompt(engine, messages, GREEDY)
    assert prompt.trimmed > 0 and prompt.trimmed % 2 == 0  # whole turns: the kept part starts with a user turn
    kept = [system, *turns[prompt.trimmed :], messages[-1]]
    assert prompt.ids == chat_prompt(engine, kept, GREEDY).ids
    assert len(prompt.ids) + GREEDY.max_tokens <= engine.context == len(prompt.ids) + prompt.room
    assert chat_prompt(engine, kept[-3:], GREEDY).trimmed == 0


def test_a_prompt_longer_than_the_context_names_the_limit(engine):
    with pytest.raises(ParamError) as e:
        chat_prompt(engine, ask("What color is Zorb? " * 40), GREEDY)
    assert e.value.code == "context_length_exceeded" and f"context is {engine.context} tokens" in str(e.value)
    with pytest.raises(ParamError, match=f"context is {engine.context}"):
        text_prompt(engine, "Zorb " * 200, GREEDY)
    with pytest.raises(ParamError) as e:
        chat_prompt(engine, [{"role": "robot", "content": "hi"}], GREEDY)
    assert e.value.param == "messages[0].role"


def test_stop_strings_cut_the_answer_and_are_never_streamed(engine):
    prompt = chat_prompt(engine, ask("Tell me about Zorb."), GREEDY)
    [full] = generate(engine, [prompt], GREEDY)
    assert " like" in full.text  # "Zorb is <colour>, like Zorb."
    params = sampling_params(GREEDY, stop=[" like", "nothing"])
    deltas: list[str] = []
    row = make_row(engine, prompt, params, emit=lambda r, d, f: deltas.append(d))
    run_rows(engine, [row])
    cut = full.text[: full.text.index(" like")]
    assert row.stream.final == cut and row.finish_reason == "stop" and "".join(deltas) == cut
    assert len(row.tokens) < len(full.token_ids)  # it stopped generating there


def test_max_tokens_ends_with_length(engine):
    prompt = chat_prompt(engine, ask("Tell me about Zorb."), GREEDY)
    [answer] = generate(engine, [prompt], sampling_params(GREEDY, max_tokens=2))
    assert answer.finish_reason == "length" and answer.completion_tokens == 2
    capped = Prompt(prompt.ids, 1)
    assert generate(engine, [capped], GREEDY)[0].completion_tokens == 1


def test_streamed_deltas_hold_back_partial_characters(engine):
    text = "Zörb — 日本 ✓ red"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    single = [engine.tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in single)  # some tokens are pieces of a character
    stream = TextStream(engine.tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text == stream.final and not any("\ufffd" in d for d in deltas)
    held = TextStream(engine.tokenizer, stop=("ed!",))
    out = "".join(held.push(i) for i in ids)
    assert out == "Zörb — 日本 ✓ r"  # "ed" might start the stop string: held back
    assert out + held.finish() == text and not held.stopped


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("repetition_penalty", 0),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("seed", "x"),
        ("stop", ["a", ""]),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 3),
        ("bogus", 1),
    ],
)
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(ParamError) as e:
        sampling_params(**{field: value})
    assert e.value.param == field and field in str(e.value)


def test_generate_texts_is_batched_greedy_for_evaluate(engine):
    rendered = [
        engine.tokenizer.apply_chat_template(ask(q), add_generation_prompt=True, tokenize=False) for q in QUESTIONS
    ]
    texts, stats = generate_texts(engine.model, engine.tokenizer, rendered, max_new_tokens=10, batch_size=2)
    want = []
    for r in rendered:
        ids = engine.tokenizer(r, add_special_tokens=False)["input_ids"]
        new = [t for t in hf_greedy(engine, ids, 10) if t not in engine.stop_ids]
        want.append(engine.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert texts == want and texts[0] in COLORS
    assert stats["gen_tokens"] >= len(texts) and stats["gen_tokens_per_s"] > 0


def test_batcher_decodes_submissions_together_and_skips_cancelled_rows(engine):
    from components.serving.batcher import Batcher

    prompts = [chat_prompt(engine, ask(q), GREEDY) for q in QUESTIONS]
    finished: dict[int, str] = {}

    def emit(row, delta, finish):
        if finish:
            finished[row.index] = finish
        if row.index == 1 and delta:
            row.cancelled.set()  # the client of row 1 leaves after its first text

    rows = [make_row(engine, p, GREEDY, emit=emit, index=i) for i, p in enumerate(prompts)]
    rows[3].cancelled.set()  # left while still queued
    batcher = Batcher(engine, max_batch=2)
    batcher.submit(rows[:2])
    batcher.submit(rows[2:])
    batcher.close(wait=True)
    alone = generate(engine, prompts, GREEDY)
    for i in (0, 2):
        assert rows[i].tokens == alone[i].token_ids and finished[i] == "stop"
    assert finished[1] == "cancelled" and len(rows[1].tokens) < len(alone[1].token_ids)
    assert 3 not in finished and rows[3].tokens == []
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(rows[:1])


def test_llama_rows_joining_mid_way_equal_hf_generate(engine):
    """The other architecture seedlm builds (rotary positions): batched, left-padded rows still match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.serving.engine import from_model

    tok = engine.tokenizer
    torch.manual_seed(0)
    conf = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    llama = from_model(LlamaForCausalLM(conf), tok, name="llama")
    prompts = [chat_prompt(llama, ask(q), GREEDY) for q in ["Hi", *QUESTIONS]]
    answers = generate(llama, prompts, GREEDY, max_batch=2)
    assert [a.token_ids for a in answers] == [hf_greedy(llama, p.ids, GREEDY.max_tokens) for p in prompts]
