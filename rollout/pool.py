"""SamplerPool: several sampler actors behind one handle.

`generate` splits a batch of prompts into contiguous, cost-balanced slices
(one per sampler), runs them concurrently and returns the completions in
prompt order (result[p][s], as `SamplerActor.generate`). The pool is also the
`WeightSyncClient` the learner's sender holds: each control-plane call fans
out to every sampler and raises `WeightSyncError` naming the samplers that
failed. `init_weight_transfer_engine` assigns each sampler its rank offset in
the transfer group (learner = rank 0, then every sampler's workers in pool
order), for the gloo and NCCL transports alike.

    pool = SamplerPool.create(model_path, cfg.rollout, cfg.student)   # inside ray.init(), CPU samplers
    pool = SamplerPool.create(..., scheduling_strategies=plan.sampler_strategies,
                              num_gpus_per_sampler=plan.gpus_per_sampler(cfg.rollout))   # the driver
    completions_P_G = pool.generate(prompts)
"""

from __future__ import annotations

from collections.abc import Sequence

from rollout.sampler import SAMPLER_MAX_CONCURRENCY, SamplerActor, unlink_shm_files
from rollout.types import Completion
from rollout.weight_sync import WeightSyncError


def split_balanced(costs: Sequence[float], num_parts: int) -> list[tuple[int, int]]:
    """Cut items (in order) into `num_parts` contiguous [start, end) slices of
    about equal total cost; every part gets at least one item while there are
    enough items (empty slices (n, n) otherwise)."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    n = len(costs)
    total = float(sum(costs))
    bounds, start, acc = [], 0, 0.0
    for part in range(num_parts):
        if part == num_parts - 1:
            end = n
        else:
            target = total * (part + 1) / num_parts
            end = start
            # Leave at least one item for each later part.
            limit = n - (num_parts - part - 1)
            while end < limit and (end == start or acc + costs[end] / 2 <= target):
                acc += costs[end]
                end += 1
        bounds.append((start, max(start, end)))
        start = max(start, end)
    return bounds


def sampler_actor_options(rollout_cfg, num_gpus: float, scheduling_strategy=None) -> dict:
    """Ray options of one sampler actor (SamplerPool.create and restart).

    `num_gpus` comes from the placement plan (`PlacementPlan.gpus_per_sampler`:
    what the sampler's bundle holds), never from the caller's own hardware:
    the driver often runs on a GPU-less head node, and a sampler asking for 0
    GPUs would see every GPU of its node (Ray sets CUDA_VISIBLE_DEVICES only
    for the GPUs an actor requests). A fraction (< 1) shares one GPU."""
    if num_gpus < 0:
        raise ValueError(f"num_gpus of a sampler must be >= 0, got {num_gpus}")
    opts = dict(max_concurrency=SAMPLER_MAX_CONCURRENCY, num_cpus=rollout_cfg.cpus_per_sampler,
                num_gpus=num_gpus)
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    return opts


def _spawn_sampler(factory: tuple, i: int, **kwargs):
    """Start sampler `i`'s actor from `SamplerPool.create`'s arguments
    (`factory`) without waiting for it; `kwargs` go to `SamplerActor`."""
    import ray

    path, rollout_cfg, student_cfg, strategies, num_gpus, cpu_cfg, lora_rank, shares = factory
    return (ray.remote(SamplerActor).options(**sampler_actor_options(rollout_cfg, num_gpus, strategies[i]))
            .remote(path, rollout_cfg, student_cfg, sampler_index=i, cpu_cfg=cpu_cfg, lora_rank=lora_rank,
                    thread_share=shares[i], **kwargs))


class SamplerPool:
    """N sampler actor handles (SamplerActor) used as one."""

    def __init__(self, samplers: list, timeout_s: float = 600.0, generate_timeout_s: float = 1800.0,
                 max_new_tokens: int = 64):
        if not samplers:
            raise ValueError("SamplerPool needs at least one sampler actor")
        self.samplers = list(samplers)
        self.timeout_s = timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.max_new_tokens = max_new_tokens
        self._workers: list[int] | None = None
        self._factory: tuple | None = None  # create()'s arguments, for restart()
        # Per sampler: vLLM's /dev/shm segments on this node, removed after the
        # sampler is shut down or killed (vLLM leaks them when killed).
        self._shm_files: dict[int, list[str]] = {}

    @classmethod
    def create(cls, model: str, rollout_cfg, student_cfg, num_samplers: int | None = None,
               scheduling_strategies: list | None = None, initial_version: int = 0, *,
               num_gpus_per_sampler: float | None = None, cpu_cfg=None, lora_rank: int = 0,
               thread_shares: list | None = None) -> "SamplerPool":
        """Start `num_samplers` (default rollout_cfg.num_samplers) actors, each
        with its own Ray scheduling strategy when given (e.g. a
        PlacementGroupSchedulingStrategy per sampler), and wait until ready.
        `num_gpus_per_sampler`: GPUs each actor requests, kept for `restart`.
        The driver passes its placement plan's (`PlacementPlan.gpus_per_sampler`:
        what each bundle holds). None, for a pool made without a plan (tests,
        benchmarks on one machine): tensor_parallel_size GPUs when this
        process sees CUDA, else 0. `cpu_cfg`: the run's `cpu:` section
        (CpuConfig; None = its defaults). `lora_rank`: learner.lora.rank
        (> 0: the samplers serve the learner's LoRA adapter, SamplerActor).
        `thread_shares[i]`: sampler i's CPU threads from the placement plan
        (cluster/placement.py cpu_thread_shares; None: bind_cpu_threads' default)."""
        num = rollout_cfg.num_samplers if num_samplers is None else num_samplers
        if scheduling_strategies is not None and len(scheduling_strategies) != num:
            raise ValueError(f"{len(scheduling_strategies)} scheduling strategies for {num} samplers")
        path = model  # a local directory or hub id; the driver resolves `tiny:` names (cluster/tiny_models.py)
        strategies = scheduling_strategies or [None] * num
        if num_gpus_per_sampler is None:
            import torch

            num_gpus_per_sampler = rollout_cfg.tensor_parallel_size if torch.cuda.is_available() else 0
        shares = thread_shares or [None] * num
        if len(shares) != num:
            raise ValueError(f"{len(shares)} thread shares for {num} samplers")
        factory = (path, rollout_cfg, student_cfg, strategies, num_gpus_per_sampler, cpu_cfg, lora_rank, shares)
        actors = [_spawn_sampler(factory, i, initial_version=initial_version) for i in range(num)]
        pool = cls(actors, timeout_s=rollout_cfg.weight_sync_timeout_s,
                   generate_timeout_s=rollout_cfg.generate_timeout_s, max_new_tokens=rollout_cfg.max_new_tokens)
        pool._factory = factory
        pool._fanout("ready", [(a.ready, ()) for a in actors], timeout_s=rollout_cfg.generate_timeout_s)
        for i in range(num):
            pool._record_shm_files(i)
        return pool

    def _record_shm_files(self, i: int) -> None:
        """Remember sampler i's /dev/shm segments if it runs on this node
        (best effort: cleanup must never fail a run)."""
        import ray

        try:
            s = self.samplers[i]
            if ray.get(s.node_id.remote(), timeout=60) == ray.get_runtime_context().get_node_id():
                self._shm_files[i] = ray.get(s.shm_files.remote(), timeout=60)
        except Exception:  # noqa: BLE001
            self._shm_files.pop(i, None)

    def _release_shm_files(self, i: int) -> None:
        unlink_shm_files(self._shm_files.pop(i, []))

    def restart(self, i: int) -> None:
        """Replace sampler `i` (dead or hung) by a fresh actor on the same
        scheduling strategy, with the same GPUs. The new sampler refuses to
        sample until it has received weights, and it is not in the current transfer group: the
        caller must re-run the sender's `connect()` (a new group over all
        samplers) and push the current weights. Only for pools made by
        `create`."""
        import ray

        if self._factory is None:
            raise RuntimeError("SamplerPool.restart needs a pool made by SamplerPool.create")
        if not 0 <= i < len(self.samplers):
            raise IndexError(f"sampler {i} does not exist (pool of {len(self.samplers)})")
        try:
            ray.kill(self.samplers[i])
        except Exception:
            pass
        self._release_shm_files(i)
        self.samplers[i] = _spawn_sampler(self._factory, i, require_update=True)
        self._workers = None
        self._fanout("ready", [(self.samplers[i].ready, ())], timeout_s=self.generate_timeout_s)
        self._record_shm_files(i)

    def __len__(self) -> int:
        return len(self.samplers)

    # -- sampling -----------------------------------------------------------

    def generate(self, prompts: list, **kwargs) -> list[list[Completion]]:
        """Same arguments as `SamplerActor.generate`; completions in prompt
        order with `prompt_index` = position in `prompts`."""
        import ray

        costs = [len(p) if isinstance(p, list) and p and isinstance(p[0], int) else
                 len(str(p)) for p in prompts]
        new = kwargs.get("max_new_tokens") or self.max_new_tokens
        slices = split_balanced([c + new for c in costs], len(self.samplers))
        refs, spans = [], []
        for sampler, (a, b) in zip(self.samplers, slices, strict=True):
            if b > a:
                refs.append(sampler.generate.remote(prompts[a:b], prompt_index_offset=a, **kwargs))
                spans.append((a, b))
        out: list[list[Completion]] = []
        for chunk in ray.get(refs, timeout=self.generate_timeout_s):
            out.extend(chunk)
        return out

    def score(self, sequences: list[list[int]], start: int | list[int] = 1) -> list[list[float]]:
        import ray

        starts = [start] * len(sequences) if isinstance(start, int) else list(start)
        slices = split_balanced([len(s) for s in sequences], len(self.samplers))
        refs = [s.score.remote(sequences[a:b], starts[a:b]) for s, (a, b) in zip(self.samplers, slices, strict=True)
                if b > a]
        return [row for chunk in ray.get(refs, timeout=self.generate_timeout_s) for row in chunk]

    def weight_versions(self) -> list[int]:
        import ray

        return ray.get([s.weight_version.remote() for s in self.samplers], timeout=self.timeout_s)

    def num_workers(self) -> list[int]:
        """Workers per sampler (their ranks in the transfer group)."""
        if self._workers is None:
            self._workers = self._fanout("num_workers", [(s.num_workers, ()) for s in self.samplers])
        return self._workers

    def engine_configs(self) -> list[dict]:
        """Each sampler's vLLM engine settings (SamplerActor.engine_config)."""
        return self._fanout("engine_config", [(s.engine_config, ()) for s in self.samplers])

    def total_workers(self) -> int:
        return sum(self.num_workers())

    # -- WeightSyncClient ---------------------------------------------------

    def _fanout(self, what: str, calls: list, timeout_s: float | None = None) -> list:
        """Run one call per sampler concurrently; wait for ALL of them, then
        raise one WeightSyncError naming every sampler that failed."""
        import ray

        refs = [fn.remote(*args) for fn, args in calls]
        timeout = self.timeout_s if timeout_s is None else timeout_s
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        results, errors = [], []
        for i, ref in enumerate(refs):
            if ref in pending:
                errors.append(f"sampler {i}: no answer after {timeout:.0f}s")
                results.append(None)
                continue
            try:
                results.append(ray.get(ref))
            except Exception as e:  # RayTaskError wraps the actor's exception
                cause = getattr(e, "cause", None) or e
                errors.append(f"sampler {i}: {type(cause).__name__}: {cause}")
                results.append(None)
        if errors:
            stage = {"init_weight_transfer_engine": "init", "update_weights": "transfer",
                     "finish_weight_update": "finish", "start_weight_update": "start"}.get(what, what)
            raise WeightSyncError(f"{what} failed on {len(errors)} of {len(refs)} samplers: " + " | ".join(errors),
                                  stage)
        return results

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """`init_info["rank_offset"]` is the first sampler worker's rank
        (1 = right after the learner); each sampler gets its own offset."""
        offset = int(init_info.get("rank_offset", 1))
        calls = []
        for sampler, workers in zip(self.samplers, self.num_workers(), strict=True):
            calls.append((sampler.init_weight_transfer_engine, (dict(init_info, rank_offset=offset),)))
            offset += workers
        self._fanout("init_weight_transfer_engine", calls)

    def start_weight_update(self) -> None:
        self._fanout("start_weight_update", [(s.start_weight_update, ()) for s in self.samplers])

    # update_weights(info, fused=True, weight_version=v) also starts the
    # update on each sampler first and finishes it after (SamplerActor.update_weights).
    fused_updates = True

    def update_weights(self, update_info: dict, fused: bool = False,
                       weight_version: str | int | None = None) -> None:
        self._fanout("update_weights", [(s.update_weights, (update_info, fused, weight_version))
                                        for s in self.samplers])

    def finish_weight_update(self, weight_version: str | int | None = None) -> None:
        self._fanout("finish_weight_update", [(s.finish_weight_update, (weight_version,)) for s in self.samplers])

    def abort_weight_update(self) -> None:
        """Close an open update on every sampler (after a partial failure of
        start_weight_update, or a sender that died before update_weights)."""
        self._fanout("abort_weight_update", [(s.abort_weight_update, ()) for s in self.samplers])

    # -- LoRA adapters ------------------------------------------------------

    def serves_lora_adapters(self) -> bool:
        """Whether every sampler serves LoRA adapters in place (else the
        learner pushes merged weights through the transfer group)."""
        return all(self._fanout("serves_lora_adapters", [(s.serves_lora_adapters, ()) for s in self.samplers]))

    def load_lora_adapter(self, version: int, files: dict[str, bytes]) -> None:
        """Every sampler serves the adapter `files` (peft's format) as policy
        `version` (SamplerActor.load_lora_adapter). The files go into Ray's
        object store once; each sampler reads them from there."""
        import ray

        ref = ray.put(files)
        self._fanout("load_lora_adapter", [(s.load_lora_adapter, (version, ref)) for s in self.samplers])

    def validate_update(self, update_info: dict) -> list[str]:
        problems = self._fanout("validate_update", [(s.validate_update, (update_info,)) for s in self.samplers])
        return sorted({p for ps in problems for p in ps})

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([s.shutdown.remote() for s in self.samplers], timeout=60)
        except Exception:
            pass
        for s in self.samplers:
            ray.kill(s)
        for i in list(self._shm_files):
            self._release_shm_files(i)
