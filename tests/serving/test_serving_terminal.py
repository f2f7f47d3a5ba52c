"""`seedlm chat`: its commands, Ctrl-C stopping an answer, errors (through a pipe: test_serving_server.py)."""

from __future__ import annotations

import io

import pytest
from _serving_fixtures import QUESTIONS, ask

from components.serving.engine import chat_prompt, generate
from components.serving.sampling import ParamError, SamplingParams
from components.serving.terminal import Chat, loop, main, parse_params

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = SamplingParams(max_tokens=256)  # the chat's default


def answer(engine, messages, params: SamplingParams = PARAMS) -> str:
    return generate(engine, [chat_prompt(engine, messages, params)], params)[0].text


def test_a_missing_model_is_an_error_message(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main([str(tmp_path), "-p", "top_p=3"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_commands_reset_system_params_quit(engine):
    script = (
        "\n".join(
            [
                "/system Answer yes or no.",
                "Is Zorb red?",
                "/params temperature=3",
                '/params max_tokens=1 stop=["x"]',
                QUESTIONS[0],
                "/reset",
                "/params max_tokens=null",
                "/system",
                QUESTIONS[1],
                "/bogus",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(engine)
    loop(chat, io.StringIO(script), out, err)
    system = {"role": "system", "content": "Answer yes or no."}
    yes_no = answer(engine, [system, *ask("Is Zorb red?")])
    short_params = SamplingParams(max_tokens=1, stop=("x",))
    short = answer(
        engine,
        [system, *ask("Is Zorb red?"), {"role": "assistant", "content": yes_no}, *ask(QUESTIONS[0])],
        short_params,
    )
    after_reset = answer(engine, ask(QUESTIONS[1]), SamplingParams(max_tokens=256, stop=("x",)))
    assert out.getvalue().splitlines() == [yes_no, short, after_reset]
    log = err.getvalue()
    assert "temperature must be in [0, 2]" in log and "unknown command /bogus" in log and "(new conversation)" in log
    assert chat.history == [*ask(QUESTIONS[1]), {"role": "assistant", "content": after_reset}]  # /quit: "never read"
    assert chat.params == SamplingParams(max_tokens=256, stop=("x",)) and chat.system == ""


def test_ctrl_c_stops_the_answer_not_the_chat(engine):
    class Interrupting(io.StringIO):
        """Output whose first write is interrupted, as Ctrl-C during an answer."""

        hits = 0

        def write(self, s: str) -> int:
            self.hits += 1
            if self.hits == 1 and s:
                raise KeyboardInterrupt
            return super().write(s)

    out, err = Interrupting(), io.StringIO()
    chat = Chat(engine)
    loop(chat, io.StringIO(f"{QUESTIONS[2]}\n{QUESTIONS[0]}\n"), out, err)
    assert "[stopped]" in err.getvalue()
    assert len(chat.history) == 4  # both turns kept; the second answered in full
    assert out.getvalue().splitlines()[-1] == chat.history[-1]["content"] == answer(engine, chat.history[:3])


def test_params_parse_values():
    p = parse_params(PARAMS, ["temperature=0.7", "top_k=5", "stop=###", "seed=3"])
    assert (p.temperature, p.top_k, p.stop, p.seed) == (0.7, 5, ("###",), 3)
    assert parse_params(p, ["seed=null", "stop=null"]) == SamplingParams(max_tokens=256, temperature=0.7, top_k=5)
    for bad in (["temperature"], ["top_p=2"], ["colour=red"]):
        with pytest.raises(ParamError):
            parse_params(PARAMS, bad)
