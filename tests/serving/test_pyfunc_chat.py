"""The registered pyfunc speaks chat: the fitted tiny chat model registered through the real register stage in a
real MLflow sqlite store, then asked with OpenAI-style chat requests and plain prompts, in process, streaming,
and through a real `mlflow models serve` (one start for the module). Answers are checked against
transformers' own greedy `generate` on the same rendered prompt; a version registered with the pyfunc of
before chat still loads; the engine the model runs is the copy shipped in its artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
from _serving_fixtures import QUESTIONS, ask, register_version
from mlflow.exceptions import MlflowException
from servers import BIN, Proc, base_env, free_port, wait_http

NAME = "seedlm-pyfunc-chat"
LEGACY = Path(__file__).with_name("legacy_pyfunc.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(model: Any) -> list[dict[str, str]]:
    """system, user, the model's own answer, user: a multi-turn chat."""
    first = model.predict([QUESTIONS[0]], params={"max_tokens": 8})[0]
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": QUESTIONS[1]},
    ]


def content(response: dict[str, Any], i: int = 0) -> str:
    return response["choices"][i]["message"]["content"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def registered(store, chat_dir, tmp_path_factory) -> str:
    """models:/NAME/VERSION of the fitted tiny chat model, registered by the register stage (champion)."""
    version = register_version(chat_dir, tmp_path_factory.mktemp("pyfunc-chat"), NAME, 0.4)
    return f"models:/{NAME}/{version}"


@pytest.fixture(scope="module")
def model(registered):
    return mlflow.pyfunc.load_model(registered)


@pytest.fixture(scope="module")
def greedy(chat_dir) -> Callable[[list[dict[str, str]], int], str]:
    """The yardstick: transformers' greedy generate on the chat template's rendering of `messages`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_dir, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(chat_dir, local_files_only=True).eval()
    stops = [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]

    def answer(messages: list[dict[str, str]], max_new: int) -> str:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        x = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(
                **x, max_new_tokens=max_new, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
            )
        new = out[0, x["input_ids"].shape[1] :]
        return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    return answer


# ---------------------------------------------------------------- predict
def test_chat_request_answers_like_greedy_generate(model, greedy):
    chat = conversation(model)
    response = model.predict({"messages": chat, "max_tokens": 8})
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    assert response["model"] == NAME
    [choice] = response["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == greedy(chat, 8) != ""
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 20
    assert response["custom_outputs"] == {"trimmed_messages": 0}
    # the same settings as params, and the first versions' name for max_tokens
    assert content(model.predict({"messages": chat}, params={"max_tokens": 8})) == content(response)
    assert content(model.predict({"messages": chat}, params={"max_new_tokens": 8})) == content(response)
    # a DataFrame with a messages column: one response per conversation, batched
    both = model.predict(pd.DataFrame({"messages": [chat, ask(QUESTIONS[2])]}), params={"max_tokens": 8})
    assert [content(r) for r in both] == [content(response), greedy(ask(QUESTIONS[2]), 8)]


def test_plain_prompts_answer_as_one_user_turn(model, greedy):
    questions = QUESTIONS[:3]
    answers = model.predict(questions, params={"max_tokens": 8})
    assert answers == [greedy(ask(q), 8) for q in questions]
    assert model.predict(pd.DataFrame({"prompt": questions}), params={"max_tokens": 8}) == answers
    assert model.predict(questions[0], params={"max_tokens": 8}) == answers[:1]
    assert model.predict({"prompt": questions[:2], "max_tokens": 8}) == answers[:2]
    assert content(model.predict({"messages": ask(questions[0]), "max_tokens": 8})) == answers[0]
    # a prompt longer than the context (64 positions) keeps its tail, as before
    (tail,) = model.predict(["Zorb " * 80], params={"max_tokens": 100})
    assert isinstance(tail, str)


def test_chat_settings_n_sampling_stop_and_length(model, greedy):
    chat = ask(QUESTIONS[2])  # "Tell me about Mavo.": a longer answer
    full = greedy(chat, 12)
    three = model.predict({"messages": chat, "max_tokens": 12, "n": 3})
    assert [c["index"] for c in three["choices"]] == [0, 1, 2] and {content(three, i) for i in range(3)} == {full}
    sampled = {"messages": chat, "max_tokens": 12, "n": 2, "temperature": 1.5, "top_p": 0.95, "top_k": 20, "seed": 5}
    assert model.predict(sampled)["choices"] == model.predict(sampled)["choices"]  # seeded: reproducible
    # do_sample=false (the first versions' switch) is greedy whatever the temperature
    assert content(model.predict({"messages": chat, "temperature": 1.5, "do_sample": False, "max_tokens": 12})) == full
    word = full.split()[1]
    cut = model.predict({"messages": chat, "max_tokens": 12, "stop": [word]})
    assert content(cut) == full[: full.index(word)].strip() and cut["choices"][0]["finish_reason"] == "stop"
    short = model.predict({"messages": chat, "max_tokens": 1})
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 1


def test_long_conversation_drops_oldest_turns_keeps_system(model, greedy):
    system = {"role": "system", "content": "Answer briefly."}
    turns = []
    for q in QUESTIONS * 2:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": "red"}]
    chat = [system, *turns, {"role": "user", "content": QUESTIONS[1]}]
    response = model.predict({"messages": chat, "max_tokens": 8})
    dropped = response["custom_outputs"]["trimmed_messages"]
    assert 0 < dropped < len(turns)
    assert content(response) == greedy([system, *chat[1 + dropped :]], 8)


BAD_INPUTS = [
    ({"messages": []}, None, "messages must be a non-empty list"),
    ({"messages": "hi"}, None, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, None, r"messages\[0\]: role must be one of"),
    ({"messages": [{"role": "user"}]}, None, r"messages\[0\]: content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, None, "unknown field 'bogus'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, None, "predict does not stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, None, "not both"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"temperature": 5.0}, r"temperature must be in \[0, 2\]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"n": 0}, r"n must be an integer in \[1, 8\]"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, None, "top_p must be in"),
    ({"messages": [{"role": "user", "content": "hi" * 200}]}, None, "context is 64 tokens"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"temperature": "hot"}, "temperature"),
    ([QUESTIONS[0]], {"n": 2}, "n applies to chat requests"),
    ([1, 2], None, r"prompts\[0\] is int 1, not a string"),
    ([], None, "no prompts given"),
    ({"foo": 1}, None, "unknown field 'foo'"),
    ({"max_tokens": 3}, None, "no messages or prompt"),
    (pd.DataFrame({"a": ["x"], "b": ["y"]}), None, "needs a 'prompt' or 'messages' column"),
    (3.5, None, "unsupported input float"),
]


@pytest.mark.parametrize(("data", "params", "match"), BAD_INPUTS)
def test_bad_input_raises_a_clear_error(model, data, params, match):
    with pytest.raises(MlflowException, match=match) as info:
        model.predict(data, params=params)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # mlflow models serve: HTTP 400


def test_predict_stream_chunks_add_up_to_the_answer(model):
    chat = ask(QUESTIONS[2])
    whole = content(model.predict({"messages": chat, "max_tokens": 12}))
    chunks = list(model.predict_stream({"messages": chat, "max_tokens": 12}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert len(chunks) > 2 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["custom_outputs"] == {"trimmed_messages": 0}
    deltas = list(model.predict_stream(QUESTIONS[2], params={"max_tokens": 12}))
    assert all(isinstance(d, str) for d in deltas) and "".join(deltas) == whole
    stream = model.predict_stream({"messages": chat, "max_tokens": 12})
    next(stream)
    stream.close()  # a consumer that leaves early ends the generation; the model answers the next request
    assert content(model.predict({"messages": chat, "max_tokens": 12})) == whole
    with pytest.raises(MlflowException, match="messages must be a non-empty list"):
        next(model.predict_stream({"messages": []}))  # before any generation
    with pytest.raises(MlflowException, match="requires single input"):  # MLflow checks it first
        next(model.predict_stream(QUESTIONS[:2]))


# ---------------------------------------------------------------- the artifact and older versions
def test_the_engine_runs_from_the_copy_shipped_in_the_artifact(registered, model, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(registered, dst_path=str(tmp_path / "dl")))
    code = local / "code" / "seedlm_engine_src" / "components"
    assert (code / "serving" / "engine.py").is_file() and not (code / "serving" / "server.py").exists()
    assert sum(p.stat().st_size for p in code.rglob("*.py")) < 300_000  # the engine's modules, nothing else
    py = model.unwrap_python_model()
    assert "seedlm_engine_src" in Path(py.engine_mod.__file__).parts
    repo_engine = sys.modules.get("components.serving.engine")  # this process's own copy is untouched
    assert repo_engine is None or "seedlm_engine_src" not in Path(repo_engine.__file__).parts
    # a fresh interpreter in which this repo's `components` cannot be imported at all loads it and answers
    script = (
        "import json, sys; sys.modules['components'] = None\n"
        "import mlflow; m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "chat = m.predict({'messages': [{'role': 'user', 'content': sys.argv[2]}], 'max_tokens': 8})\n"
        "assert sys.modules['components'] is None\n"
        "print(json.dumps([m.predict([sys.argv[2]], params={'max_tokens': 8}), chat['choices'][0]['message']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(local), QUESTIONS[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers, message = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answers == model.predict([QUESTIONS[0]], params={"max_tokens": 8}) == [message["content"]]


def test_a_version_registered_before_chat_still_loads(store, chat_dir, model):
    """Logged as the register stage did before chat (the old pyfunc file, its signature, no code_paths)."""
    from mlflow.models import infer_signature

    signature = infer_signature(
        ["q"], ["an answer"], params={"max_new_tokens": 4, "temperature": 1.0, "do_sample": False}
    )
    with mlflow.start_run(run_name="legacy-register"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(LEGACY),
            artifacts={"hf_model": str(chat_dir)},
            model_config={"max_new_tokens": 4},
            signature=signature,
            pip_requirements=["mlflow", "torch", "transformers"],
        )
    version = mlflow.register_model(info.model_uri, f"{NAME}-legacy").version
    old = mlflow.pyfunc.load_model(f"models:/{NAME}-legacy/{version}")
    assert old.metadata.flavors["python_function"].get("code") is None  # it carries only its own pyfunc file
    questions = QUESTIONS[:3]
    assert old.predict(questions, params={"max_new_tokens": 8}) == model.predict(questions, params={"max_tokens": 8})
    assert model.predict(questions[:1], params={"max_tokens": 8})  # the new one still answers beside it


# ---------------------------------------------------------------- mlflow models serve
@pytest.fixture(scope="module")
def served(registered, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve` of the champion on 127.0.0.1, in a process where this repo's `components` is not
    importable (a sitecustomize blocks it): the model runs only on what its artifact carries."""
    tmp = tmp_path_factory.mktemp("mlflow-serve")
    (tmp / "no_repo").mkdir()
    (tmp / "no_repo" / "sitecustomize.py").write_text("import sys\n\nsys.modules['components'] = None\n")
    port = free_port()
    env = base_env(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"], PYTHONPATH=str(tmp / "no_repo"))
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local"]
    proc = Proc([*cmd, "-h", "127.0.0.1", "-p", str(port)], tmp / "serve.log", env=env, cwd=tmp)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def invoke(url: str, body: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=120)


def test_mlflow_models_serve_answers_prompts_and_chat(served, model, greedy):
    r = invoke(served, {"inputs": [QUESTIONS[0]]})
    assert r.status_code == 200 and r.json() == {"predictions": model.predict([QUESTIONS[0]])}
    r = invoke(served, {"inputs": QUESTIONS[:2], "params": {"max_tokens": 8}})
    assert r.json() == {"predictions": [greedy(ask(q), 8) for q in QUESTIONS[:2]]}
    chat = conversation(model)
    r = invoke(served, {"messages": chat, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"  # the OpenAI object, unwrapped
    assert content(r.json()) == greedy(chat, 8) and r.json()["usage"]["prompt_tokens"] > 20
    body = {"messages": chat, "max_tokens": 8, "n": 2, "temperature": 0.8, "top_p": 0.9, "seed": 1, "stop": ["zzz"]}
    r = invoke(served, body)
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature must be in"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "unknown field 'bogus'"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "predict does not stream"),
        ({"inputs": [1, 2]}, "not a string"),
        ({"inputs": [{"role": "user", "content": "hi"}]}, "not a string"),
        ({"foo": 1}, "exactly one of the input fields"),
        (b"{not json", "valid JSON"),
    ],
)
def test_mlflow_models_serve_rejects_malformed_requests(served, body, match):
    r = invoke(served, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert match in r.json()["message"]
    assert invoke(served, {"inputs": [QUESTIONS[0]]}).status_code == 200  # and keeps serving
