"""Benchmark: where a CPU sampler's vLLM engine runs (`rollout.engine_process`).

    .venv/bin/python -m bench.sampler_engine                 # demo student, 2 rounds
    .venv/bin/python -m bench.sampler_engine --model student-25m --rounds 3

For each placement, one real `SamplerPool` of one sampler is created in a
local Ray cluster, side by side in this run:

* `multiprocess`: vLLM's default, the engine-core process plus (on CPU) a
  worker process, both spawned by the sampler actor;
* `inprocess`: the engine inside the sampler actor (what
  `rollout.engine_process=auto` picks on CPU).

Measured: seconds from `SamplerPool.create` to a sampler that answers; the
median seconds of one generate of `--prompts` prompts x `--samples` samples x
`--max-new-tokens` tokens (seeded: both placements draw the same tokens); the
RSS of the actor and every process under it after generating. The table
prints the ratios inprocess / multiprocess. The placements alternate over
`--rounds` rounds so that a noisy machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time


def tree_rss_mib(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure(model_path: str, engine_process: str, prompts: list[str], samples: int, max_new_tokens: int,
            repeats: int) -> dict:
    import ray

    from cluster.config import RolloutConfig, StudentConfig
    from rollout.pool import SamplerPool

    rollout_cfg = RolloutConfig(engine_process=engine_process, samples_per_prompt=samples,
                                max_new_tokens=max_new_tokens)
    student_cfg = StudentConfig(model=model_path, dtype="float32", max_model_len=256)
    t0 = time.perf_counter()
    pool = SamplerPool.create(model_path, rollout_cfg, student_cfg, num_samplers=1)
    start_s = time.perf_counter() - t0
    try:
        actor = pool.samplers[0]
        pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        ray.get(actor.generate.remote(prompts[:4], seed=0))  # first call: lazy set-up
        times, tokens = [], 0
        for r in range(repeats):
            t = time.perf_counter()
            out = ray.get(actor.generate.remote(prompts, seed=r))
            times.append(time.perf_counter() - t)
            tokens = sum(len(c.completion_ids) for row in out for c in row)
        rss = tree_rss_mib(pid)
    finally:
        pool.shutdown()
    return dict(engine=engine_process, start_s=start_s, generate_s=statistics.median(times), tokens=tokens,
                rss_mib=rss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampler_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="student", help="tiny model name (cluster/tiny_models.py SPECS)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="generate calls measured per sampler")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the two placements")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    from cluster.tiny_models import build_model

    path = str(build_model(args.model))
    prompts = [f"{(7 * i) % 90 + 10}+{(13 * i) % 90 + 10}=" for i in range(args.prompts)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    try:
        for _ in range(args.rounds):
            for engine in ("multiprocess", "inprocess"):
                rows.append(measure(path, engine, prompts, args.samples, args.max_new_tokens, args.repeats))
                print(f"[bench] {rows[-1]}", flush=True)
    finally:
        ray.shutdown()

    def med(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["engine"] == engine)

    print(f"\nmodel {args.model}: generate {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens; median of {args.rounds} round(s)")
    print(f"{'engine':>13} {'start_s':>8} {'generate_s':>11} {'rss_MiB':>8}")
    for engine in ("multiprocess", "inprocess"):
        print(f"{engine:>13} {med(engine, 'start_s'):8.1f} {med(engine, 'generate_s'):11.2f} "
              f"{med(engine, 'rss_mib'):8.0f}")
    print(f"{'in/multi':>13} {med('inprocess', 'start_s') / med('multiprocess', 'start_s'):8.2f} "
          f"{med('inprocess', 'generate_s') / med('multiprocess', 'generate_s'):11.2f} "
          f"{med('inprocess', 'rss_mib') / med('multiprocess', 'rss_mib'):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
