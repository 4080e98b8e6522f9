"""Benchmark: seconds to push a full set of student weights from the learner
(this process, rank 0 of the transfer group) into 1 and 2 vLLM CPU samplers,
over each CPU transport (gloo, shm), next to the floor: one plain in-memory
`Tensor.copy_` of the same bytes on this machine. `ratio` divides by one copy of
the model's bytes; `x delivered` by one copy of the bytes the push writes (k
samplers holding k copies: for 2 samplers the floor of twice the bytes;
source `shared`: the samplers hold one copy between them, so one copy).

    .venv/bin/python -m bench.weight_sync                       # all sizes, both transports, both GEMM layouts
    .venv/bin/python -m bench.weight_sync --models student-25m --backends shm --cpu-gemm plain --repeats 5

Each push is the whole production path: start_weight_update on every sampler,
the accept/reject vote, the buckets (rollout.weight_sync_bucket_mb; gloo:
broadcast over loopback TCP; shm: packed into the /dev/shm region, only a
header broadcast), the load in each vLLM worker (rollout.cpu_gemm=onednn, vLLM's
CPU default: vLLM's layerwise reload, re-packing every linear weight; plain:
a copy into the live weights), finish_weight_update.
The same samplers (default "auto" config: the "opd_shm" engine, which takes
both transports) serve every row of a model; they re-join a fresh group for
each (transport, sampler count); each GEMM layout gets its own pair. Phases (from the sender's last_stats):
start+vote = start RPC and the accept vote, stream = packing + shipping all
buckets, drain = waiting for the samplers' loads after the last bucket,
finish = the finish RPC (SamplerPool fuses start and finish into the
update_weights call, so those RPCs are 0 and the commit is in drain).

Sources (shm): `packed` (the weights in the model's own memory, packed into
the region per push), `resident` (learner.shm_resident_weights: moved into
their region slots first, so nothing is packed; each sampler then copies the
region into its own weights), `shared` (plain layout, rollout.shm_shared_weights:
the samplers' weights live in one shared region, the sender copies each
tensor into it, the samplers load nothing), `shared+res` (both: the sender's
weights live in a private mirror of the shared layout, a push is one bulk
copy). `sampler USS MiB`: the private memory of the k samplers after the row
(shared mappings excluded: with `shared` the weights are in one region for
all of them).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def bench_model(name: str, repeats: int, bucket_mb: int, backends: list[str], cpu_gemm: str,
                load_threads: int = 0) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.config import RolloutConfig, StudentConfig
    from cluster.tiny_models import build_model
    from learner.weight_sender import GlooWeightSender, ShmWeightSender, specs_from_named
    from rollout.pool import SamplerPool

    path = str(build_model(name))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    def live():
        """The weights as the learner yields them: its live tensors, no copy."""
        return ((n, p.detach()) for n, p in model.named_parameters())

    specs = specs_from_named(live())
    nbytes = sum(s.nbytes for s in specs)
    rollout = RolloutConfig(weight_sync_bucket_mb=bucket_mb, kv_cache_gib=1.0, max_new_tokens=8, cpu_gemm=cpu_gemm,
                            weight_load_threads=load_threads)
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
        for backend in backends:
            for k in (1, 2):
                pool = SamplerPool(both.samplers[:k], timeout_s=600)
                # packed: the weights live in the model's own memory and are
                # packed into the region (or the gloo buffer) per push; resident
                # (shm only): moved into their region slots first, as learner
                # rank 0 does with learner.shm_resident_weights; both with every
                # sampler loading its own copy. shared (shm, plain layout:
                # rollout.shm_shared_weights): the samplers' parameters live in
                # one region the sender writes into.
                sources = ["packed", "resident"] if backend == "shm" else ["packed"]
                if backend == "shm" and cpu_gemm == "plain":
                    sources += ["shared", "shared+res"]
                sender = None
                for source in sources:
                    shared_mode = source.startswith("shared")
                    if sender is None or source == "shared":
                        if sender is not None:
                            sender.shutdown()
                        if backend == "gloo":
                            sender = GlooWeightSender(pool, "127.0.0.1", _port(), bucket_bytes=bucket_mb << 20,
                                                      timeout_s=600)
                        else:
                            sender = ShmWeightSender(pool, "127.0.0.1", _port(), bucket_bytes=bucket_mb << 20,
                                                     timeout_s=600, share_weights=shared_mode)
                        sender.connect()
                        # Warm-up: the first reload builds the layout and maps the region;
                        # shared: the first update records the copies, the second one
                        # creates the shared region and the samplers adopt it.
                        for _ in range(2 if shared_mode else 1):
                            version += 1
                            sender.send(version, specs, live())
                    if source in ("resident", "shared+res"):
                        # shared+res: into the sender's private mirror of the shared layout.
                        assert sender.adopt(model.named_parameters()) == nbytes
                    times, phases = [], []
                    for _ in range(repeats):
                        version += 1
                        t = time.perf_counter()
                        sender.send(version, specs, live())
                        times.append(time.perf_counter() - t)
                        phases.append(sender.last_stats)
                    assert pool.weight_versions() == [version] * k
                    resident = statistics.median(p["sync/resident_bytes"] for p in phases)
                    assert resident == (nbytes if source in ("resident", "shared+res") else 0), (source, resident)
                    shared = [p.get("sync/shared", 0.0) for p in phases]
                    assert all(x == shared_mode for x in shared), (source, shared, sender.shared_refused)
                    push = statistics.median(times)
                    # Private memory of the k samplers (shared mappings, e.g. a shared
                    # weight region, are not in it).
                    uss = sum(psutil.Process(pid).memory_full_info().uss for pid in pids[:k]) / 2**20
                    # Shared: one copy of the bytes reaches every sampler.
                    delivered = floor if shared_mode else floor_delivered[k]
                    rows.append(dict(model=name, backend=backend, gemm=cpu_gemm, source=source, load_threads=load_threads,
                                     params_m=sum(s.numel for s in specs) / 1e6, mib=nbytes / 2**20, samplers=k,
                                     push_s=push, floor_s=floor, ratio=push / floor, uss_mib=uss,
                                     ratio_delivered=push / delivered,
                                     **{key.removeprefix("sync/"): statistics.median(p[key] for p in phases)
                                        for key in ("sync/start_vote_s", "sync/stream_s", "sync/drain_s",
                                                    "sync/finish_s")}))
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
    ap.add_argument("--backends", nargs="+", default=["gloo", "shm"], choices=["gloo", "shm"])
    ap.add_argument("--cpu-gemm", nargs="+", default=["onednn", "plain"], choices=["onednn", "plain"],
                    help="the samplers' rollout.cpu_gemm: onednn (vLLM's layerwise reload) / plain (in place)")
    ap.add_argument("--load-threads", nargs="+", type=int, default=[0],
                    help="rollout.weight_load_threads of the samplers (plain layout; 0 = auto: the cores / samplers)")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in args.models:
            for gemm in args.cpu_gemm:
                for threads in args.load_threads if gemm == "plain" else [0]:
                    rows += bench_model(name, args.repeats, args.bucket_mb, args.backends, gemm, threads)
    finally:
        ray.shutdown()
    print(f"\nweight sync push (median of {args.repeats}), bucket {args.bucket_mb} MiB, fp32; gloo = loopback TCP, "
          f"shm = /dev/shm region + gloo headers")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine => noisy)")
    print(f"{'model':<14}{'params':>9}{'MiB':>9}{'gemm':>8}{'load thr':>9}{'transport':>10}{'source':>11}{'samplers':>9}{'push s':>9}"
          f"{'copy floor s':>13}"
          f"{'ratio':>8}{'x delivered':>12}{'sampler USS MiB':>16}   | start+vote  stream  drain  finish (s)")
    for r in rows:
        print(f"{r['model']:<14}{r['params_m']:>8.1f}M{r['mib']:>9.1f}{r['gemm']:>8}"
              f"{(r['load_threads'] or 'auto') if r['gemm'] == 'plain' else '-':>9}{r['backend']:>10}{r['source']:>11}"
              f"{r['samplers']:>9}"
              f"{r['push_s']:>9.3f}{r['floor_s']:>13.4f}{r['ratio']:>7.1f}x{r['ratio_delivered']:>11.1f}x{r['uss_mib']:>16.0f}"
              f"   | {r['start_vote_s']:>10.3f}"
              f"{r['stream_s']:>8.3f}{r['drain_s']:>7.3f}{r['finish_s']:>8.3f}")


if __name__ == "__main__":
    main()
