"""Benchmark: tokens scored per second by teacher_server, side by side with
(a) the same vLLM engine scoring offline in-process (the ceiling) and
(b) vLLM's own OpenAI-compatible server with `prompt_logprobs` (what a user
would run instead), at several batch sizes (sequences per request) and client
concurrencies; and the same scoring through opd's `TeacherClient` against
both servers (teacher.backend=opd vs teacher.backend=vllm: what a run gets). Each route runs alone (one engine at a time), on the same model,
the same sequences and the same vLLM options (float32, enforce_eager, default
CPU thread binding).

    .venv/bin/python -m bench.teacher_server                       # tiny teacher, a few minutes
    .venv/bin/python -m bench.teacher_server --model tiny:teacher-100m --num-seqs 256
    .venv/bin/python -m bench.teacher_server --client-only    # only the TeacherClient rows

Next to them, (c) a plain transformers forward of the same model on the same
chunks (float32, `log_softmax` gathered at the given tokens, converted to
lists as the server must): the model's own cost, at the thread count every
vLLM CPU engine here runs with (vLLM's default, every core but one, or
`--threads N`) and at every core.
For teacher_server's JSON route the table "where the time goes" splits the
mean request, as its client sees it, into the server's phases (its /metrics
`teacher_phase_seconds`: body read, decode, validate, vLLM engine, output
conversion, encode) and what is outside the server process (HTTP transport,
the client's own encode and decode).

"Tokens scored" are the positions start .. len-1 of every sequence (here the
second half: a prompt plus a completion of equal length). The offline ceiling of
a (batch B, concurrency C) row is `LLM.generate` on chunks of B x C sequences,
the most the server can have in flight in that row; its conversion of vLLM's
output to per-token arrays is included, as the server must do it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import msgspec
import numpy as np

from rollout.host import free_port
from teacher_server.metrics import PHASES

REPO = Path(__file__).resolve().parents[1]


def resolve_model(spec: str) -> str:
    if spec.startswith("tiny:"):
        from cluster.tiny_models import build_model
        return str(build_model(spec.removeprefix("tiny:")))
    return spec


def make_sequences(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"token_ids": rng.integers(0, vocab, length).tolist(), "start": length // 2} for _ in range(n)]


def scored_tokens(seqs) -> int:
    return sum(len(s["token_ids"]) - s["start"] for s in seqs)


# ----------------------------------------------------------------------------- (a) offline ceiling

def bench_offline(model: str, max_model_len: int, seqs, configs, repeats: int) -> dict:
    from vllm import LLM

    from teacher_server.engine import prompt_logprobs_to_result, sampling_params_for_scoring

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_model_len, max_logprobs=-1,
              seed=0)
    params = sampling_params_for_scoring(0, 1.0)

    def score(part):
        res = llm.generate([{"prompt_token_ids": s["token_ids"]} for s in part], params, use_tqdm=False)
        return [prompt_logprobs_to_result(o.prompt_logprobs, s["token_ids"], s["start"], 0, 1.0)
                for o, s in zip(res, part, strict=True)]

    try:
        score(seqs[:8])  # warm-up
        return best_chunked(score, seqs, configs, repeats)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def best_chunked(score, seqs, configs, repeats: int) -> dict:
    """`score` on chunks of B x C sequences (the most a server can have in
    flight in that row), all sequences per run: tokens/s, best of `repeats`."""
    out = {}
    for b, c in configs:
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(seqs), b * c):
                score(seqs[i:i + b * c])
            best = max(best, scored_tokens(seqs) / (time.perf_counter() - t0))
        out[(b, c)] = best
    return out


# ----------------------------------------------------------------------------- (c) plain transformers forward

def bench_transformers(model: str, seqs, configs, repeats: int, threads: int) -> tuple[dict, list[list[float]]]:
    """The model's forward alone, on the same chunks as the offline ceiling
    (sequences of one length, so no padding): (tokens/s best of `repeats`,
    the logprobs of the first 4 sequences)."""
    import torch
    from transformers import AutoModelForCausalLM

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def score(part) -> list[list[float]]:
        ids_B_T = torch.tensor([s["token_ids"] for s in part])
        start = part[0]["start"]
        with torch.inference_mode():
            logits_B_P_V = hf(ids_B_T).logits[:, start - 1:-1].float()
            lps_B_P_V = torch.log_softmax(logits_B_P_V, dim=-1)
            given_B_P = lps_B_P_V.gather(2, ids_B_T[:, start:, None])[..., 0]
        return given_B_P.tolist()

    try:
        assert len({(len(s["token_ids"]), s["start"]) for s in seqs}) == 1, "one length and start for all"
        score(seqs[:8])  # warm-up
        return best_chunked(score, seqs, configs, repeats), score(seqs[:4])
    finally:
        torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- servers

def launch(args: list[str], ready_path: str, log_path: str, timeout_s: float = 300.0,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[:4]} exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(ready_path, timeout=5) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{args[:4]} not ready after {timeout_s}s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def drive(post_batch, seqs, batch: int, concurrency: int, before=None) -> tuple[float, float]:
    """C workers, each sending B sequences per request until all are scored:
    (tokens/s, mean seconds per request as the client sees it, from sending
    the body to holding the decoded answer). `before()` runs after the warm-up."""
    batches = [seqs[i:i + batch] for i in range(0, len(seqs), batch)]
    it = iter(batches)
    took: list[float] = []

    async def worker(session):
        for part in it:
            t = time.perf_counter()
            await post_batch(session, part)
            took.append(time.perf_counter() - t)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await post_batch(session, seqs[:2])  # warm-up (connections, first request)
        if before is not None:
            before()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return scored_tokens(seqs) / (time.perf_counter() - t0), sum(took) / len(took)


def ours_poster(url: str, binary: bool):
    from teacher_server.protocol import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, LogprobsResponse, decode, encode

    ct = CONTENT_TYPE_MSGPACK if binary else CONTENT_TYPE_JSON

    async def post(session, part):
        body = encode({"sequences": part, "top_k": 0, "temperature": 1.0}, ct)
        async with session.post(url + "/v1/logprobs", data=body, headers={"Content-Type": ct}) as r:
            raw = await r.read()
            assert r.status == 200, raw[:300]
        res = decode(raw, LogprobsResponse, ct).results
        assert len(res[0].logprobs) == len(part[0]["token_ids"]) - part[0]["start"]
        return [x.logprobs for x in res]

    return post


def vllm_poster(url: str, model: str):
    async def post(session, part):
        body = {"model": model, "prompt": [s["token_ids"] for s in part], "max_tokens": 1, "prompt_logprobs": 0}
        async with session.post(url + "/v1/completions", json=body) as r:
            raw = await r.read()
            assert r.status == 200, raw[:300]
        choices = sorted(msgspec.json.decode(raw)["choices"], key=lambda c: c["index"])
        # Entry p: {token_id: {"logprob", "rank", "decoded_token"}}; look the given token up by id.
        return [[c["prompt_logprobs"][p][str(s["token_ids"][p])]["logprob"]
                 for p in range(s["start"], len(s["token_ids"]))] for c, s in zip(choices, part, strict=True)]

    return post


def bench_server(post, seqs, configs, repeats: int) -> dict:
    return {(b, c): max(asyncio.run(drive(post, seqs, b, c))[0] for _ in range(repeats)) for b, c in configs}


def server_phases(url: str) -> dict[str, float]:
    """teacher_server's cumulative /metrics for /v1/logprobs: phase and latency
    sums (seconds) and the number of admitted requests."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("endpoint") != "/v1/logprobs":
                continue
            if s.name == "teacher_phase_seconds_sum":
                out[s.labels["phase"]] = s.value
            elif s.name == "teacher_request_latency_seconds_sum":
                out["server"] = s.value
            elif s.name == "teacher_request_latency_seconds_count":
                out["count"] = s.value
    return out


def bench_breakdown(post, url: str, seqs, configs) -> dict:
    """One run per config: the mean request as the client sees it and the
    server's phases of the same requests (differences of /metrics), seconds."""
    out = {}
    for b, c in configs:
        marks = {}
        _, client = asyncio.run(drive(post, seqs, b, c, before=lambda: marks.update(server_phases(url))))
        after = server_phases(url)
        n = after["count"] - marks["count"]
        row = {k: (after.get(k, 0.0) - marks.get(k, 0.0)) / n for k in (*PHASES, "server")}
        row["client"] = client
        row["outside"] = client - row["server"] - row["read"]
        out[(b, c)] = row
    return out


def bench_client(url: str, backend: str, seqs, configs, repeats: int) -> dict:
    """TeacherClient.score of all sequences (packs of B sequences, C in flight):
    tokens/s, best of `repeats`. The first call also probes the server."""
    from rollout.teacher_client import TeacherClient

    pairs = [(s["token_ids"], s["start"]) for s in seqs]
    out = {}
    for b, c in configs:
        budget = b * max(len(ids) for ids, _ in pairs)
        with TeacherClient(url, backend=backend, max_tokens_per_request=budget, max_concurrency=c) as client:
            client.score(pairs[:2])  # warm-up (probe, connections)
            best = 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = client.score(pairs)
                assert not res.errors, res.errors[:3]
                best = max(best, scored_tokens(seqs) / (time.perf_counter() - t0))
        out[(b, c)] = best
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny:teacher")
    p.add_argument("--num-seqs", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--configs", default="1x16,8x4,32x2,64x1", help="BATCHxCONCURRENCY,...")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is reported")
    p.add_argument("--client-only", action="store_true",
                   help="only TeacherClient through opd's server vs through vLLM's server")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of every vLLM engine (0: vLLM's CPU default, every core but one): "
                        "VLLM_CPU_OMP_THREADS_BIND on the first N cores for the offline engine and vLLM's "
                        "server, OMP_NUM_THREADS for teacher_server (whose engine runs in its engine-core "
                        "process without vLLM's binding, as a run's teacher does)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cores = len(os.sched_getaffinity(0))
    engine_threads = args.threads or max(1, cores - 1)
    if args.threads:
        if args.threads > cores:
            p.error(f"--threads {args.threads}: this process may use {cores} cores")
        first = sorted(os.sched_getaffinity(0))[:args.threads]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, first))  # offline + vLLM's server inherit it
    server_env = {"OMP_NUM_THREADS": str(engine_threads)}
    model = resolve_model(args.model)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    import json
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    seqs = make_sequences(args.num_seqs, args.seq_len, vocab)
    logdir = tempfile.mkdtemp(prefix="bench_teacher_")
    print(f"model {model}: {args.num_seqs} sequences x {args.seq_len} tokens, "
          f"{scored_tokens(seqs)} scored per run; every vLLM engine at {engine_threads} thread(s); "
          f"logs in {logdir}", flush=True)

    offline = {} if args.client_only else bench_offline(model, args.max_model_len, seqs, configs, args.repeats)
    print("offline done", flush=True)
    hf_threads = sorted({engine_threads, cores})  # the engines' threads, every core
    hf, hf_ref = {}, None
    if not args.client_only:
        for t in hf_threads:
            hf[t], hf_ref = bench_transformers(model, seqs, configs, args.repeats, t)
        print("transformers done", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launch([sys.executable, "-m", "teacher_server", "--model", model, "--port", str(port), "--dtype",
                   "float32", "--max-model-len", str(args.max_model_len), "--max-queue", "1024"],
                  url + "/health", os.path.join(logdir, "teacher_server.log"), env=server_env)
    try:
        client_opd = bench_client(url, "opd", seqs, configs, args.repeats)
        if not args.client_only:
            ours_json = bench_server(ours_poster(url, False), seqs, configs, args.repeats)
            ours_msgpack = bench_server(ours_poster(url, True), seqs, configs, args.repeats)
            breakdown = bench_breakdown(ours_poster(url, False), url, seqs, configs)
        ref_ours = asyncio.run(_once(ours_poster(url, False), seqs[:4]))
    finally:
        stop(proc)
    print("teacher_server done", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launch([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                   "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len",
                   str(args.max_model_len), "--max-logprobs", "20", "--seed", "0"],
                  url + "/health", os.path.join(logdir, "vllm_server.log"))
    try:
        client_vllm = bench_client(url, "vllm", seqs, configs, args.repeats)
        if not args.client_only:
            vllm = bench_server(vllm_poster(url, model), seqs, configs, args.repeats)
        ref_vllm = asyncio.run(_once(vllm_poster(url, model), seqs[:4]))
    finally:
        stop(proc)
    diff = max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(ref_ours, ref_vllm, strict=True))

    print(f"\nmax |teacher_server - vllm serve| logprob difference on 4 sequences: {diff:.2e}")
    print("TeacherClient.score, tokens scored per second (best of %d)" % args.repeats)
    hdr = f"{'batch':>5} {'conc':>4} | {'backend=opd':>11} {'backend=vllm':>12} | {'opd/vllm':>8}"
    print(hdr)
    print("-" * len(hdr))
    for b, c in configs:
        o, v = client_opd[(b, c)], client_vllm[(b, c)]
        print(f"{b:>5} {c:>4} | {o:>11.0f} {v:>12.0f} | {o / v:>8.2f}")
    if args.client_only:
        return
    hf_diff = max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(ref_ours, hf_ref, strict=True))
    print(f"max |teacher_server - transformers| logprob difference on 4 sequences: {hf_diff:.2e}")
    print()
    print("tokens scored per second (best of %d); hf<N>t = transformers forward at N threads" % args.repeats)
    hf_cols = [f"hf{t}t" for t in hf_threads]
    hdr = (f"{'batch':>5} {'conc':>4} | {'offline':>9} {'ours-json':>9} {'ours-msgp':>9} {'vllm-srv':>9} "
           + " ".join(f"{h:>7}" for h in hf_cols) + " | "
           f"{'json/off':>8} {'msgp/off':>8} {'json/vllm':>9} {'msgp/vllm':>9} "
           + " ".join(f"{'json/' + h:>11}" for h in hf_cols))
    print(hdr)
    print("-" * len(hdr))
    for b, c in configs:
        o, j, m, v = offline[(b, c)], ours_json[(b, c)], ours_msgpack[(b, c)], vllm[(b, c)]
        h = [hf[t][(b, c)] for t in hf_threads]
        print(f"{b:>5} {c:>4} | {o:>9.0f} {j:>9.0f} {m:>9.0f} {v:>9.0f} " + " ".join(f"{x:>7.0f}" for x in h)
              + f" | {j / o:>8.2f} {m / o:>8.2f} {j / v:>9.2f} {m / v:>9.2f} "
              + " ".join(f"{j / x:>11.2f}" for x in h))
    print()
    print("where the time goes: mean ms per /v1/logprobs request (teacher_server, JSON), one run per row;")
    print("client = as the client sees it; in-server = admitted time not in a phase (event loop, waiting);")
    print("outside = client - read - the server's latency (HTTP transport, the client's encode and decode)")
    cols = ("client", *PHASES, "in-server", "outside")
    hdr = f"{'batch':>5} {'conc':>4} | " + " ".join(f"{k:>9}" for k in cols) + f" | {'engine%':>7}"
    print(hdr)
    print("-" * len(hdr))
    for b, c in configs:
        r = dict(breakdown[(b, c)])
        r["in-server"] = r["server"] - sum(r[p] for p in PHASES if p != "read")
        print(f"{b:>5} {c:>4} | " + " ".join(f"{1e3 * r[k]:>9.1f}" for k in cols)
              + f" | {100 * r['engine'] / r['client']:>6.0f}%")


async def _once(post, part):
    async with aiohttp.ClientSession() as s:
        return await post(s, part)


if __name__ == "__main__":
    main()
