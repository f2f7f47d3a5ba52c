"""Serving throughput and latency: `seedlm serve` under 1, 4 and 16 concurrent clients vs bare `model.generate`.

    python bench/serve_bench.py [--model REF] [--clients 1,4,16] [--prompts 16] [--max-tokens 32]   (make bench-serve)
                                [--baseline process|inline] [--stream-interval SECONDS]

The model: --model (a `models:/` URI or a model folder), else the `make run` pipeline's champion
(`models:/seedlm@champion`). The server runs as its own process (`python -m components.serving.server`,
pinned to that version) on 127.0.0.1; every client here streams (`stream: true`) and sends the whole prompt
set (the embedded world's held-out questions) one request after another, each client starting at another
prompt. The baseline, in the same run: HF `model.generate` on the same prompts (batch 1, greedy, the same max
tokens and stop tokens, the same torch thread count), timed inside a worker process and session of its own,
so that, like the server, it runs in a process that waited while the other side ran, and the clients' process
stays a light client (on a busy machine a process that has just spent 30 ms decoding sends and reads its next
request measurably later: 0.65x vs 0.74x in one interleaved run; `--baseline inline` runs it in the clients'
process as before). `--stream-interval` passes the server's option (default: the server's own). Each round
runs the baseline and the 1-client level prompt by prompt in turn (so both see the same machine load), then the
larger client counts; ratios are medians of per-round ratios. "= bare" is the share of answers identical to the
baseline's (greedy: batching must not change them). Goals (issue 10): server at 1 client >= 0.8x bare tok/s;
16 clients >= 2x the 1-client aggregate tok/s; p95 time to first token at 16 clients < 1 s.
Results go to bench/results/serve_bench-<time>.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

if TYPE_CHECKING:
    from components.serving.engine import Engine

RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = "models:/seedlm@champion"
GOALS = {"server_1_vs_bare": 0.8, "scaling_16_vs_1": 2.0, "p95_ttft_16_s": 1.0}


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- model and prompts
def pick_model(ref: str | None) -> str:
    """--model, else the pipeline's champion; a clear error when neither exists."""
    if ref:
        return ref
    from components.registry.models import alias_version, tracking_uri

    if alias_version("seedlm", "champion") is None:
        raise BenchError(
            f"no models:/seedlm@champion in {tracking_uri()}: run `make run` first, or pass "
            "--model with a models:/ URI or a model folder"
        )
    return DEFAULT_MODEL


def questions(n: int) -> list[str]:
    """n questions about the embedded world (params.yaml's synthetic settings), held-out ones first."""
    from components.core.config import load_params
    from components.data.synthetic import instruction_rows

    params = load_params(ROOT / "params.yaml")
    rows = sorted(
        instruction_rows(params.ingest.synthetic, params.seed), key=lambda r: (r["split"] != "test", r["task"] != "qa")
    )
    return [r["messages"][0]["content"] for r in rows[:n]]


# ---------------------------------------------------------------- the server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    ref: str, threads: int, max_batch: int, log: Path, stream_interval: float | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m components.serving.server REF` on a free port; returns (process, base url) once healthy."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "components.serving.server",
        ref,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch",
        str(max_batch),
        "--follow-interval",
        "86400",
    ]
    if stream_interval is not None:
        args += ["--stream-interval", str(stream_interval)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise BenchError(f"the server was not healthy after 300 s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------- clients
async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict[str, Any]:
    """One streamed chat completion: latency, time to the first text, completion tokens, the text."""
    t0 = time.perf_counter()
    ttft, tokens, text = None, None, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"the server answered {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise BenchError(f"the stream carried an error: {event['error']}")
            delta = "".join(c["delta"].get("content") or "" for c in event.get("choices", []))
            if delta and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(delta)
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    latency = time.perf_counter() - t0
    if tokens is None:
        raise BenchError("the stream ended without a usage event (stream_options.include_usage)")
    return {"latency": latency, "ttft": latency if ttft is None else ttft, "tokens": tokens, "text": "".join(text)}


def request_body(question: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def level(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    """`clients` concurrent clients, each sending every prompt in turn (client k starts at prompt k)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one_client(k: int) -> list[dict]:
            out = []
            for i in range(len(prompts)):
                j = (k + i) % len(prompts)
                out.append({"prompt": j, **await one_request(client, url, request_body(prompts[j], max_tokens))})
            return out

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one_client(k) for k in range(clients)))
        return time.perf_counter() - t0, [r for per_client in done for r in per_client]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(wall: float, results: list[dict], bare_texts: list[str]) -> dict[str, Any]:
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    same = sum(r["text"].strip() == bare_texts[r["prompt"]] for r in results)
    return {
        "requests": len(results),
        "seconds": wall,
        "requests_per_s": len(results) / wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "latency_p50_s": pct(lat, 50),
        "latency_p95_s": pct(lat, 95),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "same_as_bare": same / len(results),
    }


# ---------------------------------------------------------------- the baseline
def encoded(engine: Engine, prompts: list[str], max_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max new tokens) exactly as the server builds them."""
    from components.serving.engine import chat_prompt
    from components.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    out = []
    for q in prompts:
        p = chat_prompt(engine, [{"role": "user", "content": q}], params)
        out.append((p.ids, min(max_tokens, engine.context - len(p.ids))))
    return out


def bare_one(engine: Engine, ids: list[int], max_new: int) -> dict[str, Any]:
    """HF model.generate on one prompt: batch 1, greedy, the server's stop tokens."""
    import torch

    t0 = time.perf_counter()
    x = torch.tensor([ids], device=engine.model.device)
    with torch.inference_mode():
        out = engine.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(engine.stop_ids),
            pad_token_id=engine.pad_id,
        )
    new = out[0, len(ids) :].tolist()
    text = engine.tokenizer.decode(new, skip_special_tokens=True).strip()
    return {"latency": time.perf_counter() - t0, "tokens": len(new), "text": text}


def _bare_worker(conn: Any, ref: str, threads: int) -> None:
    """The baseline's process: loads `ref`, then answers each (prompt ids, max new) with bare_one's result."""
    os.setsid()  # a session (scheduling group) of its own, like the server's
    import torch

    from components.serving.engine import load_engine

    torch.set_num_threads(threads)
    engine = load_engine(ref)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(bare_one(engine, *job))


class Baseline:
    """bare_one in a worker process of its own (`inline`: in this process, with `engine`)."""

    def __init__(self, engine: Engine, ref: str, threads: int, inline: bool = False) -> None:
        self.engine, self.proc, self.conn = engine, None, None
        if inline:
            return
        ctx = multiprocessing.get_context("spawn")  # not fork: this process has torch's threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_bare_worker, args=(child, ref, threads), daemon=True)
        self.proc.start()
        child.close()
        try:
            ready = self.conn.recv() if self.conn.poll(300) else None
        except EOFError:
            ready = None
        if ready != "ready":
            proc = self.proc
            self.close()
            raise BenchError(f"the baseline's worker process did not start (exit code {proc.exitcode})")

    def run(self, ids: list[int], max_new: int) -> dict[str, Any]:
        if self.proc is None:
            return bare_one(self.engine, ids, max_new)
        self.conn.send((ids, max_new))
        return self.conn.recv()

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
            self.proc = None


async def paired(bare: Baseline, url: str, prompts: list[str], ids: list, max_tokens: int) -> tuple[list, list]:
    """The baseline and one server client, prompt by prompt in turn, so both see the same machine load."""
    out_bare, server = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for j, question in enumerate(prompts):
            out_bare.append({"prompt": j, **bare.run(*ids[j])})
            server.append({"prompt": j, **await one_request(client, url, request_body(question, max_tokens))})
    return out_bare, server


def bare_summary(results: list[dict]) -> dict[str, Any]:
    lat, tokens = [r["latency"] for r in results], sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "seconds": sum(lat),
        "tokens": tokens,
        "tok_s": tokens / sum(lat),
        "latency_p50_s": pct(lat, 50),
        "latency_p95_s": pct(lat, 95),
    }


# ---------------------------------------------------------------- the run
def one_round(bare: Baseline, url: str, prompts: list[str], ids: list, args: argparse.Namespace) -> dict:
    """1 client paired with the baseline (its time: the sum of its request latencies), then each larger count."""
    bare, single = asyncio.run(paired(bare, url, prompts, ids, args.max_tokens))
    texts = [r["text"] for r in bare]
    server = {1: summarize(sum(r["latency"] for r in single), single, texts)}
    for c in args.clients[1:]:
        server[c] = summarize(*asyncio.run(level(url, prompts, c, args.max_tokens)), texts)
    return {"bare": bare_summary(bare), "server": server}


def measure(engine: Engine, bare: Baseline, url: str, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Warm-up, then `rounds` rounds."""
    ids = encoded(engine, prompts, args.max_tokens)
    asyncio.run(paired(bare, url, prompts[:2], ids[:2], args.max_tokens))  # allocator, kernels, first calls
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(bare, url, prompts, ids, args))
        tok_s = ", ".join(f"{c} clients {s['tok_s']:,.0f}" for c, s in rounds[-1]["server"].items())
        print(f"  round {r + 1}/{args.rounds}: bare {rounds[-1]['bare']['tok_s']:,.0f} tok/s, {tok_s}", file=sys.stderr)
    return rounds


def report(rounds: list[dict], clients: list[int]) -> dict[str, Any]:
    """Medians over rounds of each figure, and the three goal ratios."""
    med = statistics.median
    keys = ("requests_per_s", "tok_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "same_as_bare")
    server = {c: {k: med([r["server"][c][k] for r in rounds]) for k in keys} for c in clients}
    bare = {k: med([r["bare"][k] for r in rounds]) for k in ("tok_s", "latency_p50_s", "latency_p95_s")}
    lo, hi = min(clients), max(clients)
    ratios = {
        "server_1_vs_bare": med([r["server"][lo]["tok_s"] / r["bare"]["tok_s"] for r in rounds]),
        f"scaling_{hi}_vs_{lo}": med([r["server"][hi]["tok_s"] / r["server"][lo]["tok_s"] for r in rounds]),
        f"p95_ttft_{hi}_s": server[hi]["ttft_p95_s"],
    }
    return {"bare": bare, "server": server, "ratios": ratios}


def verdict(key: str, value: float) -> str:
    if key not in GOALS:
        return ""
    goal, below = GOALS[key], key.startswith("p95")
    met = value < goal if below else value >= goal
    return f"  (goal {'<' if below else '>='} {goal}: {'met' if met else 'MISSED'})"


def print_table(out: dict[str, Any]) -> None:
    print(
        f"\n{'':<14}{'req/s':>8}{'tok/s':>9}{'p50 lat':>10}{'p95 lat':>10}{'p50 TTFT':>10}{'p95 TTFT':>10}{'= bare':>8}"
    )
    b = out["bare"]
    print(f"{'bare generate':<14}{'':>8}{b['tok_s']:>9,.0f}{b['latency_p50_s']:>9.3f}s{b['latency_p95_s']:>9.3f}s")
    for c, s in out["server"].items():
        print(
            f"{f'{c} clients':<14}{s['requests_per_s']:>8.1f}{s['tok_s']:>9,.0f}{s['latency_p50_s']:>9.3f}s"
            f"{s['latency_p95_s']:>9.3f}s{s['ttft_p50_s']:>9.3f}s{s['ttft_p95_s']:>9.3f}s{s['same_as_bare']:>8.0%}"
        )
    for k, v in out["ratios"].items():
        print(f"{k}: {v:.3f}{verdict(k, v)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=f"models:/ URI or model folder (default: {DEFAULT_MODEL})")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the set (each client sends them all)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (ratios: median of per-round ratios)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and baseline (serve's default)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument(
        "--stream-interval",
        type=float,
        default=None,
        help="the server's --stream-interval in seconds (default: the server's own default)",
    )
    ap.add_argument(
        "--baseline",
        choices=("process", "inline"),
        default="process",
        help="where bare generate runs: a worker process of its own, or the clients' process (default: %(default)s)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of saved runs")
    args = ap.parse_args(argv)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    if args.clients[0] != 1:
        ap.error("--clients must include 1 (the level compared with the bare baseline)")
    try:
        return run(args)
    except BenchError as e:
        print(f"serve_bench: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    ref = pick_model(args.model)  # before the seconds of importing torch and transformers
    import torch

    from components.serving.engine import load_engine

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    engine = load_engine(ref)  # an alias is read once: the server and the baseline get this version
    ref = engine.fingerprint if engine.version else ref
    prompts = questions(args.prompts)
    print(
        f"seedlm serve bench: {engine.label}, {len(prompts)} prompts, max_tokens {args.max_tokens}, clients "
        f"{args.clients}, {args.threads} thread(s), {args.rounds} rounds, baseline: {args.baseline}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="seedlm-serve-bench-") as tmp:
        proc, url = start_server(ref, args.threads, args.max_batch, Path(tmp) / "server.log", args.stream_interval)
        bare = None
        try:
            bare = Baseline(engine, ref, args.threads, inline=args.baseline == "inline")
            rounds = measure(engine, bare, url, prompts, args)
        finally:
            if bare is not None:
                bare.close()
            stop_server(proc)
    out = {
        "config": {
            "model": engine.label,
            "source": ref,
            "prompts": len(prompts),
            "max_tokens": args.max_tokens,
            "clients": args.clients,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "rounds": args.rounds,
            "baseline": args.baseline,
            "stream_interval": args.stream_interval,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        **report(rounds, args.clients),
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
        "seconds": time.perf_counter() - t_start,
    }
    print_table(out)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"serve_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"saved {path}", file=sys.stderr)
    print(
        json.dumps(
            {
                "model": engine.label,
                **out["ratios"],
                "bare_tok_s": out["bare"]["tok_s"],
                **{f"server_{c}_tok_s": s["tok_s"] for c, s in out["server"].items()},
                "goals": GOALS,
                "results": str(path),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
