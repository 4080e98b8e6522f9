"""Benchmark: seconds to push a full set of student weights from the learner
(this process, rank 0 of the transfer group) into 1 and 2 vLLM CPU samplers
over gloo, next to the floor: one plain in-memory `Tensor.copy_` of the same
bytes on this machine. `ratio` divides by one copy of the model's bytes;
`x delivered` by one copy of the bytes the push writes (k samplers holding k
copies: for 2 samplers the floor of twice the bytes).

    .venv/bin/python -m bench.weight_sync                       # all sizes
    .venv/bin/python -m bench.weight_sync --models student-25m --repeats 5

Each push is the whole production path: start_weight_update on every sampler,
the accept/reject vote, the buckets (rollout.weight_sync_bucket_mb, broadcast
over loopback TCP), the load in each vLLM worker (vLLM's layerwise reload,
re-packing every linear weight for oneDNN), finish_weight_update. The same
samplers serve every row of a model; they re-join a fresh group for each
sampler count. Phases (from the sender's last_stats): start+vote = start RPC
and the accept vote, stream = packing + shipping all buckets, drain = waiting
for the samplers' loads after the last bucket, finish = the finish RPC
(SamplerPool fuses start and finish into the update_weights call, so those
RPCs are 0 and the commit is in drain). `sampler USS MiB`: the private memory
of the k samplers after the row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from rollout.host import free_port


def copy_floor_s(nbytes: int, repeats: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, repeats: int, bucket_mb: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.config import RolloutConfig, StudentConfig
    from cluster.tiny_models import build_model
    from learner.weight_sender import GlooWeightSender, specs_from_named
    from rollout.pool import SamplerPool

    path = str(build_model(name))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def live():
        """The weights as the learner yields them: its live tensors, no copy."""
        return ((n, p.detach()) for n, p in model.named_parameters())

    specs = specs_from_named(live())
    nbytes = sum(s.nbytes for s in specs)
    rollout = RolloutConfig(weight_sync_bucket_mb=bucket_mb, max_new_tokens=8)
    both = SamplerPool.create(path, rollout, StudentConfig(max_model_len=256), num_samplers=2)
    import psutil
    import ray

    pids = ray.get([s.pid.remote() for s in both.samplers])
    rows = []
    version = 0
    try:
        floor = copy_floor_s(nbytes, max(5, repeats))
        # A push into k samplers writes k copies: the floor of the bytes delivered.
        floor_delivered = {1: floor, 2: copy_floor_s(2 * nbytes, max(5, repeats))}
        for k in (1, 2):
            pool = SamplerPool(both.samplers[:k], timeout_s=600)
            sender = GlooWeightSender(pool, "127.0.0.1", free_port(), bucket_bytes=bucket_mb << 20, timeout_s=600)
            sender.connect()
            version += 1
            sender.send(version, specs, live())  # warm-up: the first reload builds the layout
            times, phases = [], []
            for _ in range(repeats):
                version += 1
                t = time.perf_counter()
                sender.send(version, specs, live())
                times.append(time.perf_counter() - t)
                phases.append(sender.last_stats)
            assert pool.weight_versions() == [version] * k
            push = statistics.median(times)
            uss = sum(psutil.Process(pid).memory_full_info().uss for pid in pids[:k]) / 2**20
            rows.append(dict(model=name, params_m=sum(s.numel for s in specs) / 1e6, mib=nbytes / 2**20, samplers=k,
                             push_s=push, floor_s=floor, ratio=push / floor, uss_mib=uss,
                             ratio_delivered=push / floor_delivered[k],
                             **{key.removeprefix("sync/"): statistics.median(p[key] for p in phases)
                                for key in ("sync/start_vote_s", "sync/stream_s", "sync/drain_s", "sync/finish_s")}))
            print(f"# {rows[-1]}", flush=True)
            sender.shutdown()
    finally:
        both.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["student", "student-25m", "teacher-100m"],
                    help="cluster/tiny_models.SPECS names (any architecture can play the student here)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=64)
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in args.models:
            rows += bench_model(name, args.repeats, args.bucket_mb)
    finally:
        ray.shutdown()
    print(f"\nweight sync push over gloo (loopback TCP), median of {args.repeats}, bucket {args.bucket_mb} MiB, fp32")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine => noisy)")
    print(f"{'model':<14}{'params':>9}{'MiB':>9}{'samplers':>9}{'push s':>9}{'copy floor s':>13}"
          f"{'ratio':>8}{'x delivered':>12}{'sampler USS MiB':>16}   | start+vote  stream  drain  finish (s)")
    for r in rows:
        print(f"{r['model']:<14}{r['params_m']:>8.1f}M{r['mib']:>9.1f}{r['samplers']:>9}"
              f"{r['push_s']:>9.3f}{r['floor_s']:>13.4f}{r['ratio']:>7.1f}x{r['ratio_delivered']:>11.1f}x"
              f"{r['uss_mib']:>16.0f}   | {r['start_vote_s']:>10.3f}{r['stream_s']:>8.3f}{r['drain_s']:>7.3f}"
              f"{r['finish_s']:>8.3f}")


if __name__ == "__main__":
    main()
