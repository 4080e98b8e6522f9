"""Benchmark: does a CPU sampler generate more slowly when its weights live
in a /dev/shm region (rollout.shm_shared_weights) instead of private memory?

tmpfs pages are 4 KiB where the engine's own allocations may get transparent
huge pages, so the question is fair. One in-process vLLM CPU engine with the
plain GEMM layout (rollout.cpu_gemm=plain, the layout shared mode needs)
generates the same seeded batch with its parameters in private memory and
rebound to a shared-memory mapping (`param.data = slot`, what the receiver
does), the two placements alternated over the rounds.

    .venv/bin/python -m bench.shm_generate --models student-25m teacher-100m --rounds 4
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
import warnings


def _place(worker, where: str) -> str:
    """Runs in the engine's worker: move every parameter to private memory or
    into one /dev/shm mapping (each on a 4 KiB boundary)."""
    import torch

    params = list(worker.model_runner.model.parameters())
    if where == "private":
        with torch.no_grad():
            for p in params:
                p.data = p.data.clone()
        return where
    sizes = [-(-p.numel() * p.element_size() // 4096) * 4096 for p in params]
    path = f"/dev/shm/opd-bench-shm-generate-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, sum(sizes))
        mm = mmap.mmap(fd, sum(sizes))
    finally:
        os.close(fd)
        os.unlink(path)
    off = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p, size in zip(params, sizes, strict=True):
            slot = torch.frombuffer(mm, dtype=p.dtype, count=p.numel(), offset=off).view(p.shape)
            slot.copy_(p.data)
            p.data = slot
            off += size
    return where


def bench_model(name: str, rounds: int, prompts: int, tokens: int) -> dict:
    import rollout.weight_receiver as wr
    from cluster.tiny_models import build_model
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(build_model(name)), dtype="float32", max_model_len=256, enforce_eager=True,
              load_format=wr.PLAIN_GEMM_LOAD_FORMAT, seed=0)
    batch = [{"prompt_token_ids": [5, 40 + i % 50, 41, 42]} for i in range(prompts)]
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=1, ignore_eos=True)
    llm.generate(batch, params, use_tqdm=False)  # warm-up
    times: dict[str, list[float]] = {"private": [], "shm": []}
    for r in range(rounds):
        for where in ("private", "shm") if r % 2 == 0 else ("shm", "private"):
            llm.collective_rpc(_place, args=(where,))
            t = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            times[where].append(time.perf_counter() - t)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == prompts * tokens
    del llm
    return {"model": name, **{k: statistics.median(v) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["student-25m", "teacher-100m"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as a CPU sampler runs it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = [bench_model(m, args.rounds, args.prompts, args.tokens) for m in args.models]
    print(f"\ngenerate {args.prompts} prompts x {args.tokens} tokens, plain GEMM layout, median of {args.rounds} "
          f"(alternated); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'model':<14}{'private s':>11}{'shm s':>9}{'shm/private':>13}")
    for r in rows:
        print(f"{r['model']:<14}{r['private']:>11.3f}{r['shm']:>9.3f}{r['shm'] / r['private']:>12.2f}x")


if __name__ == "__main__":
    main()
