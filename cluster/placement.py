"""Ray cluster start/join and placement groups per role.

Called by the driver (cluster/train.py) before any actor starts:

    ray_info = connect(cfg.placement)                  # local cluster or join
    plan = make_placement(cfg.placement, cfg.rollout, cfg.learner, ray_info)
    plan.sampler_strategies[i]  -> scheduling strategy of sampler actor i
    plan.learner_strategies[r]  -> scheduling strategy of learner rank r
    plan.gpus_per_sampler(cfg.rollout), plan.gpus_per_bundle -> num_gpus of a sampler / learner actor
    plan.cpu_threads(...)       -> threads of each CPU sampler, learner rank and teacher (cpu_thread_shares)

One placement group per role: samplers (one bundle per sampler engine, with
`gpus_per_bundle x tensor_parallel_size` GPUs on GPU) and learners (one bundle
per rank, `gpus_per_bundle` GPUs). Every actor requests exactly what its bundle
holds: Ray sets CUDA_VISIBLE_DEVICES to those GPUs only (an actor with
num_gpus=0 sees every GPU of its node), and a request larger than the bundle
is refused ("cannot fit into any bundles"). Each
group uses `placement.strategy` (PACK / SPREAD / STRICT_*), so a user can keep
a role on one node or spread it. Ray reserves the bundles atomically, so a run
that does not fit fails at start with a message instead of half-starting.
"""

from __future__ import annotations

import dataclasses
import os
import time

from cluster.config import LearnerConfig, PlacementConfig, RolloutConfig
from rollout.config import ThreadShare


class PlacementError(RuntimeError):
    pass


@dataclasses.dataclass
class RayInfo:
    started_local: bool  # this process started a local cluster (and stops it at the end)
    cluster_gpus: float


# A local cluster keeps no idle workers: every actor has its own worker
# process, and the few tasks the driver runs (a learner address probe) would
# otherwise leave one behind with torch imported (~300 MiB), beside the workers
# Ray starts ahead of time (~80 MiB each). Each key can be set back through
# its environment variable (RAY_num_workers_soft_limit=-1, ...), which wins.
LOCAL_RAY_SYSTEM_CONFIG = {"num_workers_soft_limit": 0, "enable_worker_prestart": False,
                           "prestart_worker_first_driver": False}


def local_ray_system_config(environ=os.environ) -> dict:
    """LOCAL_RAY_SYSTEM_CONFIG less the keys set in `environ` (RAY_<key>)."""
    return {k: v for k, v in LOCAL_RAY_SYSTEM_CONFIG.items() if f"RAY_{k}" not in environ}


def connect(pcfg: PlacementConfig, env_vars: dict[str, str] | None = None) -> RayInfo:
    """Join `placement.ray_address` / RAY_ADDRESS (e.g. under `ray job submit`),
    or start a local cluster (none set, or the address "local").
    `env_vars` reach every actor (runtime_env)."""
    import ray

    address = pcfg.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(env_vars or {})}
    if ray.is_initialized():
        started = False
    elif address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        started = False
    else:
        kwargs = {}
        if pcfg.local_num_cpus is not None:
            kwargs["num_cpus"] = pcfg.local_num_cpus
        # address="local": always a new cluster, never silently joining another
        # Ray cluster that happens to run on this machine. RAY_ADDRESS=local
        # (Ray's own spelling of the same) comes here too, so that it gets
        # placement.local_num_cpus and the settings below rather than Ray's
        # defaults (one CPU per core, which a one-node run cannot place).
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 _system_config=local_ray_system_config(), **kwargs)
        started = True
    res = ray.cluster_resources()
    return RayInfo(started_local=started, cluster_gpus=float(res.get("GPU", 0)))


@dataclasses.dataclass
class PlacementPlan:
    gpus_per_bundle: float
    sampler_group: object
    learner_group: object
    sampler_strategies: list
    learner_strategies: list

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_bundle > 0

    def gpus_per_sampler(self, rcfg: RolloutConfig) -> float:
        """GPUs each sampler actor requests: exactly what its bundle holds
        (`SamplerPool.create(num_gpus_per_sampler=...)`). The driver never asks
        its own hardware: under `ray job submit` it usually runs on a GPU-less
        head node. Learner ranks request `gpus_per_bundle`, as their bundles hold."""
        return sampler_gpus(self.gpus_per_bundle, rcfg.tensor_parallel_size)

    def describe(self) -> dict:
        """Which node each bundle landed on (written to <run.dir>/placement.json)."""
        from ray.util import placement_group_table

        out = {"gpus_per_bundle": self.gpus_per_bundle}
        for role, pg in (("samplers", self.sampler_group), ("learners", self.learner_group)):
            t = placement_group_table(pg)
            nodes = t.get("bundles_to_node_id", {})
            out[role] = {"strategy": t.get("strategy"), "bundles": t.get("bundles"),
                         "node_ids": [nodes.get(i) for i in sorted(nodes)]}
        return out

    def cpu_threads(self, mode: str, overlap: bool, rcfg: RolloutConfig, lcfg: LearnerConfig,
                    teacher_cpus: float, layout: dict | None = None) -> CpuThreads:
        """cpu_thread_shares for this plan's bundles (`layout`: describe())."""
        import ray

        layout = layout or self.describe()
        node_cpus = {n["NodeID"]: n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
        return cpu_thread_shares(mode, overlap, layout["samplers"]["node_ids"], layout["learners"]["node_ids"],
                                 node_cpus, rcfg.cpus_per_sampler, lcfg.cpus_per_worker, teacher_cpus)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in (self.sampler_group, self.learner_group):
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


@dataclasses.dataclass(frozen=True)
class CpuThreads:
    """Per process of each CPU role: its ThreadShare (see cpu_thread_shares)."""
    samplers: list[ThreadShare]
    learners: list[ThreadShare]
    teacher: ThreadShare


def own_share(cpus: float, role: str) -> ThreadShare:
    return ThreadShare(count=max(1, int(cpus)), reason=f"{role}: its own share ({cpus:g} CPUs reserved)")


def cpu_thread_shares(mode: str, overlap: bool, sampler_nodes: list, learner_nodes: list,
                      node_cpus: dict, sampler_cpus: float, learner_cpus: float, teacher_cpus: float) -> CpuThreads:
    """How many threads each CPU process runs, from where the plan put them.

    In train.mode=sync the roles take turns (sample, score, train), so a role
    that runs alone in its phase gets its node's cores, split evenly among
    its own processes on that node (`sampler_nodes[i]` / `learner_nodes[r]`:
    the node of sampler i / rank r; `node_cpus`: Ray's CPU count per node).
    `overlap` (train.rollout_chunks > 1, or train.sample_from=teacher):
    samplers and teacher run at the same time, so both keep their own share.
    In async mode every role keeps its own share: the CPUs Ray reserves for
    it (at least one thread). The driver-started teacher's node is not known
    here; running alone it gets the cores of whatever node it lands on."""
    def on_node(nodes: list, i: int, role: str) -> ThreadShare:
        k = sum(1 for n in nodes if n == nodes[i])
        return ThreadShare(divisor=k, node_cpus=float(node_cpus.get(nodes[i], 0) or 0),
                           reason=f"{role}: runs alone in its phase (train.mode=sync), its node's cores"
                                  + (f" / {k} {role}s there" if k > 1 else ""))

    sync = mode == "sync"
    if sync and not overlap:
        samplers = [on_node(sampler_nodes, i, "sampler") for i in range(len(sampler_nodes))]
        one_node = float(next(iter(node_cpus.values()))) if len(node_cpus) == 1 else 0.0
        teacher = ThreadShare(node_cpus=one_node, reason="teacher: runs alone in its phase (train.mode=sync), "
                                                         "its node's cores")
    else:
        samplers = [own_share(sampler_cpus, "sampler") for _ in sampler_nodes]
        teacher = own_share(teacher_cpus, "teacher")
    if sync:
        learners = [on_node(learner_nodes, r, "learner") for r in range(len(learner_nodes))]
    else:
        learners = [own_share(learner_cpus, "learner") for _ in learner_nodes]
    return CpuThreads(samplers=samplers, learners=learners, teacher=teacher)


def sampler_gpus(gpus_per_bundle: float, tensor_parallel_size: int) -> float:
    """GPUs of one sampler bundle, and of the sampler actor placed in it:
    `gpus_per_bundle` per engine worker (a fraction < 1 shares a GPU; config
    validation allows it only with tensor_parallel_size 1)."""
    return gpus_per_bundle * tensor_parallel_size if gpus_per_bundle > 0 else 0.0


def bundles_for(pcfg: PlacementConfig, rcfg: RolloutConfig, lcfg: LearnerConfig,
                gpus_per_bundle: float) -> tuple[list[dict], list[dict]]:
    """The resource bundles of the sampler and learner groups."""
    sampler = {"CPU": rcfg.cpus_per_sampler}
    learner = {"CPU": lcfg.cpus_per_worker}
    if gpus_per_bundle > 0:
        sampler["GPU"] = sampler_gpus(gpus_per_bundle, rcfg.tensor_parallel_size)
        learner["GPU"] = gpus_per_bundle
    if pcfg.sampler_resource:
        sampler[pcfg.sampler_resource] = 0.001
    if pcfg.learner_resource:
        learner[pcfg.learner_resource] = 0.001
    return [dict(sampler) for _ in range(rcfg.num_samplers)], [dict(learner) for _ in range(lcfg.world_size)]


def make_placement(pcfg: PlacementConfig, rcfg: RolloutConfig, lcfg: LearnerConfig, info: RayInfo,
                   timeout_s: float = 300.0, teacher_tensor_parallel_size: int = 0) -> PlacementPlan:
    """`teacher_tensor_parallel_size`: the GPUs a driver-started teacher
    books beside the groups when the run has GPUs (its own Ray actor,
    cluster/teacher_proc.py; 0 = the teacher runs elsewhere): they count in
    the GPU check."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = pcfg.gpus_per_bundle
    if gpus is None:
        gpus = 1.0 if info.cluster_gpus > 0 else 0.0
    s_bundles, l_bundles = bundles_for(pcfg, rcfg, lcfg, gpus)
    teacher_gpus = teacher_tensor_parallel_size if gpus > 0 else 0
    need_gpu = sum(b.get("GPU", 0) for b in s_bundles + l_bundles) + teacher_gpus
    if need_gpu > info.cluster_gpus:
        teacher = f" + {teacher_gpus} for the teacher the driver starts (teacher.tensor_parallel_size)" \
            if teacher_gpus else ""
        raise PlacementError(
            f"the run needs {need_gpu:g} GPUs ({rcfg.num_samplers} samplers x {rcfg.tensor_parallel_size} "
            f"+ {lcfg.world_size} learner ranks, placement.gpus_per_bundle={gpus:g}{teacher}) but the Ray cluster "
            f"has {info.cluster_gpus:g}; lower rollout.num_samplers / learner.world_size"
            f"{', serve the teacher elsewhere (teacher.url)' if teacher_gpus else ''}, or set "
            f"placement.gpus_per_bundle=0 for a CPU-only run")
    s_pg = placement_group(s_bundles, strategy=pcfg.strategy, name="opd-samplers")
    l_pg = placement_group(l_bundles, strategy=pcfg.strategy, name="opd-learners")
    import ray

    t0 = time.monotonic()
    for pg, role, bundles in ((s_pg, "sampler", s_bundles), (l_pg, "learner", l_bundles)):
        left = max(1.0, timeout_s - (time.monotonic() - t0))
        try:
            ray.get(pg.ready(), timeout=left)
        except ray.exceptions.GetTimeoutError as e:
            raise PlacementError(
                f"could not reserve the {role} placement group {bundles} with strategy {pcfg.strategy} within "
                f"{timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}. Lower the role's size or "
                f"resources, or use placement.strategy=PACK") from e
    return PlacementPlan(
        gpus_per_bundle=gpus,
        sampler_group=s_pg,
        learner_group=l_pg,
        sampler_strategies=[PlacementGroupSchedulingStrategy(s_pg, placement_group_bundle_index=i,
                                                             placement_group_capture_child_tasks=True)
                            for i in range(len(s_bundles))],
        learner_strategies=[PlacementGroupSchedulingStrategy(l_pg, placement_group_bundle_index=i,
                                                             placement_group_capture_child_tasks=True)
                            for i in range(len(l_bundles))],
    )
