"""Weight sync end to end: this pytest process is learner rank 0 and pushes
weights into two real vLLM CPU samplers (rollout/pool.py,
rollout/weight_receiver.py, learner/weight_sender.py) over the CPU transport
(a real gloo group; the samplers load each update with vLLM's layerwise
reload). The end of the file is the GPU transport (vLLM's NCCL engine): what
of it runs on this CPU machine, on one GPU, and on two.

    .venv/bin/python -m pytest tests/e2e/test_weight_sync.py -q
"""

import copy
import threading

import pytest
import ray
import torch

from learner.weight_sender import specs_from_named
from rollout.weight_sync import ParamSpec, WeightSyncError
from tests.fixtures.sampler import reference_logprobs

SEQS = [[5, 40, 41, 42, 43, 44, 45, 46], [1, 80, 81, 82, 83, 2, 90]]


def perturbed(hf, seed: int, scale: float = 0.05):
    model = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def named_params(model):
    return [(n, p.detach()) for n, p in model.named_parameters()]


def push(sender, version, model):
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    sender.send(version, specs_from_named(named), iter(named))


def max_score_diff(pool, model) -> float:
    """Worst |logprob| difference between every sampler and `model`."""
    worst = 0.0
    for sampler in pool.samplers:
        got = ray.get(sampler.score.remote(SEQS, 1))
        for seq, row in zip(SEQS, got, strict=True):
            want = reference_logprobs(model, seq)
            worst = max(worst, max(abs(a - b) for a, b in zip(row, want, strict=True)))
    return worst


def test_pool_generates_in_prompt_order_like_one_sampler(sampler_pair, student_sampler):
    """Before any push: the pool splits 5 prompts over 2 samplers and returns
    them in prompt order; seeds follow the prompt, not the split."""
    pool, _ = sampler_pair
    prompts = [[5, 40 + i, 41, 42] for i in range(5)]
    got = pool.generate(prompts, n=2, seed=9)
    want = ray.get(student_sampler.generate.remote(prompts, n=2, seed=9))
    assert [[c.prompt_index for c in g] for g in got] == [[i, i] for i in range(5)]
    assert [[c.prompt_ids for c in g] for g in got] == [[p, p] for p in prompts]
    assert [[c.completion_ids for c in g] for g in got] == [[c.completion_ids for c in g] for g in want]


def test_push_makes_every_sampler_serve_the_new_weights(sampler_pair, student_hf):
    pool, sender = sampler_pair
    assert pool.weight_versions() == [0, 0]
    new = perturbed(student_hf, seed=1)
    assert max_score_diff(pool, new) > 1e-2  # the samplers do not serve it yet
    push(sender, 1, new)
    assert pool.weight_versions() == [1, 1]
    assert sender.last_stats["sync/buckets"] > 1  # it really went in several buckets
    assert max_score_diff(pool, new) < 1e-4
    # Sampled-token logprobs and versions come from the new policy too.
    groups = pool.generate([[5, 40, 41], [7, 50]], n=2, temperature=1.0, seed=2)
    for g in groups:
        for c in g:
            assert c.policy_version == 1
            ref = reference_logprobs(new, c.prompt_ids + c.completion_ids)[len(c.prompt_ids) - 1:]
            assert max(abs(a - b) for a, b in zip(c.sampler_logprobs, ref, strict=True)) < 1e-4
    # A second update over the first, then back to `new` (what the later
    # tests expect to be served).
    newer = perturbed(student_hf, seed=11)
    push(sender, 2, newer)
    assert pool.weight_versions() == [2, 2]
    assert max_score_diff(pool, newer) < 1e-4
    push(sender, 3, new)
    assert max_score_diff(pool, new) < 1e-4


@pytest.mark.parametrize("bad", ["shape", "unknown_name", "missing"])
def test_rejected_update_changes_nothing(sampler_pair, student_hf, bad):
    pool, sender = sampler_pair
    before = pool.weight_versions()
    current = perturbed(student_hf, seed=1)  # what test_push... left serving
    named = [(n, p.detach()) for n, p in perturbed(student_hf, seed=99).named_parameters()]
    specs = specs_from_named(named)
    if bad == "shape":
        named[3] = (named[3][0], torch.zeros(7, 7))
        specs[3] = ParamSpec(specs[3].name, "float32", (7, 7))
        match = r"has shape \[7, 7\], the sampler's model expects"
    elif bad == "unknown_name":
        named[0] = ("model.not_a_layer.weight", named[0][1])
        specs[0] = ParamSpec("model.not_a_layer.weight", specs[0].dtype, specs[0].shape)
        match = r"unknown parameter 'model.not_a_layer.weight'"
    else:
        named, specs = named[:-1], specs[:-1]
        match = r"missing from the update"
    with pytest.raises(WeightSyncError, match=match):
        sender.send(before[0] + 1, specs, iter(named))
    assert pool.weight_versions() == before
    assert max_score_diff(pool, current) < 1e-4


def test_sender_failure_mid_stream_blocks_sampling_until_a_full_update(sampler_pair, student_hf):
    """The learner dies half-way through (its iterator raises after several
    buckets were loaded): the samplers refuse to sample from mixed weights,
    keep their version, and recover with the next full update."""
    pool, sender = sampler_pair
    before = pool.weight_versions()
    named = [(n, p.detach()) for n, p in perturbed(student_hf, seed=5).named_parameters()]

    def dying():
        for i, item in enumerate(named):
            if i == len(named) - 2:
                raise RuntimeError("simulated gather failure on the learner")
            yield item

    with pytest.raises(RuntimeError, match="simulated gather failure"):
        sender.send(before[0] + 1, specs_from_named(named), dying())
    assert pool.weight_versions() == before
    for sampler in pool.samplers:
        assert "aborted" in ray.get(sampler.needs_full_update.remote())
        with pytest.raises(Exception, match="partially updated weights"):
            ray.get(sampler.generate.remote([[5, 6, 7]]))
    fresh = perturbed(student_hf, seed=6)
    push(sender, before[0] + 2, fresh)
    assert pool.weight_versions() == [before[0] + 2] * 2
    assert max_score_diff(pool, fresh) < 1e-4


def test_generate_waits_while_an_update_is_open(sampler_pair, student_hf):
    pool, sender = sampler_pair
    version = pool.weight_versions()[0] + 1
    new = perturbed(student_hf, seed=7)
    named = [(n, p.detach()) for n, p in new.named_parameters()]
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()  # start_weight_update has returned on every sampler
        release.wait(60)
        yield from named

    errors = []
    t = threading.Thread(target=lambda: _run(errors, sender.send, version, specs_from_named(named), slow()))
    t.start()
    assert started.wait(60)
    ref = pool.samplers[0].generate.remote([[5, 40, 41]], n=1, seed=1)
    ready, _ = ray.wait([ref], timeout=2.0)
    assert not ready, "generate ran while a weight update was open"
    release.set()
    t.join(120)
    assert not errors, errors
    (c,), = ray.get(ref)
    assert c.policy_version == version
    ref_lp = reference_logprobs(new, c.prompt_ids + c.completion_ids)[len(c.prompt_ids) - 1:]
    assert max(abs(a - b) for a, b in zip(c.sampler_logprobs, ref_lp, strict=True)) < 1e-4


def test_failed_start_is_rolled_back_on_every_sampler(sampler_pair, student_hf):
    """Sampler 0 already has an update open (a stale sender): the new push
    fails at start, the sender closes the update on every sampler, both keep
    serving their weights, and the next push goes through."""
    pool, sender = sampler_pair
    before = pool.weight_versions()
    current = perturbed(student_hf, seed=1)
    ray.get(pool.samplers[0].start_weight_update.remote())
    # The pool fuses start into update_weights: sampler 0 cannot start, votes
    # reject, and sampler 1 (which could) gives the update up unloaded.
    with pytest.raises(WeightSyncError, match=r"update_weights failed on 2 of 2 samplers: sampler 0: .*"
                                              r"start_weight_update while an update is open.*\| sampler 1: .*"
                                              r"rejected by another participant"):
        push(sender, before[0] + 1, current)
    assert pool.weight_versions() == before
    groups = pool.generate([[5, 6, 7], [8, 9]], n=1)
    assert [c.policy_version for g in groups for c in g] == before
    push(sender, before[0] + 1, current)
    assert pool.weight_versions() == [before[0] + 1] * 2
    assert max_score_diff(pool, current) < 1e-4


def test_restarted_sampler_serves_only_after_receiving_current_weights(sampler_pair, student_hf):
    """A sampler left inside a receive its sender gave up (what a timed-out
    NCCL push leaves: its broadcast never returns) reports it, and the
    driver's check picks it, and only it, for a restart (cluster/loop.py
    samplers_to_restart). It is replaced; the new one refuses to sample from
    its checkpoint weights until the sender re-forms the group and pushes the
    current ones."""
    from cluster.loop import samplers_to_restart
    from rollout.host import free_port

    pool, sender = sampler_pair
    version = pool.weight_versions()[0] + 1
    named = named_params(perturbed(student_hf, seed=9))
    entered, release = threading.Event(), threading.Event()

    def hung():  # the learner stalls after the vote: both samplers wait inside the receive
        entered.set()
        release.wait(120)
        raise RuntimeError("the learner gave the update up")
        yield

    errors = []
    t = threading.Thread(target=lambda: _run(errors, sender.send, version, specs_from_named(named), hung()))
    t.start()
    try:
        assert entered.wait(60), "the update never got past the vote"
        assert samplers_to_restart(pool) == {}  # receiving is not being stuck
        # The sender gives the update up on sampler 1 only (say it timed out there).
        ray.get(pool.samplers[1].abort_weight_update.remote("test: the sender timed out", wait_s=1.0))
        assert ray.get(pool.samplers[1].stuck_in_weight_receive.remote()) == "test: the sender timed out"
        assert samplers_to_restart(pool) == {1: "stuck in a weight receive (test: the sender timed out)"}
    finally:
        release.set()
        t.join(120)
    assert len(errors) == 1 and "gave the update up" in str(errors[0])
    pool.restart(1)
    with pytest.raises(Exception, match="restarted: waiting for the learner's current weights"):
        ray.get(pool.samplers[1].generate.remote([[5, 6, 7]]))
    sender.reconnect(free_port())
    current = perturbed(student_hf, seed=8)
    push(sender, version, current)
    assert pool.weight_versions() == [version, version]
    assert max_score_diff(pool, current) < 1e-4
    assert [c.policy_version for g in pool.generate([[5, 6], [7, 8]], n=1) for c in g] == [version, version]
    assert samplers_to_restart(pool) == {}


def _run(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001  (reported by the test)
        errors.append(e)


# ------------------------------------------------- vLLM's NCCL engine (GPU transport)
#
# What needs which machine:
# * test_vllm_nccl_engine_failed_update_is_rolled_back: any machine. vLLM's
#   NCCLWeightTransferEngine on this machine's device (a CPU worker here, one
#   GPU where there is one); no NCCL call is made, so one device is enough.
# * test_nccl_*: two GPUs or more. A real NCCL pair: learner rank 0 (a Ray
#   actor here, as in a run) and a sampler, each on its own GPU; NCCL
#   refuses two ranks on one device ("Duplicate GPU detected").
# On a GPU machine all three: .venv/bin/python -m pytest tests/e2e/test_weight_sync.py -k nccl


def _nccl_engine_sampler_cls():
    """SamplerActor whose engine is vLLM's NCCL weight-transfer engine on
    whatever device the actor has (`rollout.weight_sync_backend` forbids
    "nccl" without a GPU; the engine itself is built on a CPU worker too),
    plus `land` to put tensors into the model the way vLLM's packed receive
    does (`post_unpack_func=model.load_weights`, packed_tensor.py)."""
    from rollout.sampler import SamplerActor

    class NcclEngineSampler(SamplerActor):
        def __init__(self, *args, **kwargs):
            import rollout.sampler

            rollout.sampler.engine_backend = lambda *_: "nccl"
            super().__init__(*args, **kwargs)

        def land(self, named):
            self.llm.collective_rpc(lambda worker, named: worker.model_runner.model.load_weights(named),
                                    args=(list(named),))

    return NcclEngineSampler


def _score_diff(sampler, model) -> float:
    got = ray.get(sampler.score.remote(SEQS, 1))
    return max(abs(a - b) for seq, row in zip(SEQS, got, strict=True)
               for a, b in zip(row, reference_logprobs(model, seq), strict=True))


def test_vllm_nccl_engine_failed_update_is_rolled_back(ray_session, student_path, student_hf):
    """vLLM's NCCL engine opens its layerwise reload in start_weight_update
    (every layer to the meta device) and, when a receive fails, vLLM's worker
    leaves it open. The sampler rolls it back (rollout/weight_receiver.py
    opd_abort_weight_update): with nothing received it serves its old weights
    exactly; with part of an update landed it refuses to sample. The
    receive fails here because no trainer ever connected (no NCCL group)."""
    from rollout.sampler import SAMPLER_MAX_CONCURRENCY
    from tests.fixtures.sampler import sampler_configs

    cuda = torch.cuda.is_available()
    rollout_cfg, student_cfg = sampler_configs(**({"gpu_memory_utilization": 0.3} if cuda else {}))
    actor = ray.remote(_nccl_engine_sampler_cls()).options(
        max_concurrency=SAMPLER_MAX_CONCURRENCY, num_cpus=1, num_gpus=1 if cuda else 0).remote(
        student_path, rollout_cfg, student_cfg)
    try:
        (state,) = ray.get(actor.weight_states.remote())
        assert state["engine"] == "NCCLWeightTransferEngine" and not state["reload_open"]
        named = named_params(perturbed(student_hf, seed=21))
        info = {"names": [n for n, _ in named], "dtype_names": ["float32"] * len(named),
                "shapes": [list(t.shape) for _, t in named]}
        # 1. The update fails before any weight arrives.
        ray.get(actor.start_weight_update.remote())
        assert ray.get(actor.weight_states.remote())[0]["reload_open"]
        with pytest.raises(Exception, match="NCCL weight transfer not initialized"):
            ray.get(actor.update_weights.remote(info))
        (state,) = ray.get(actor.weight_states.remote())
        assert not state["reload_open"] and not state["dirty"], state
        assert ray.get(actor.needs_full_update.remote()) is None
        assert _score_diff(actor, student_hf) < 1e-4  # the old weights, exactly as before
        # 2. The sender dies between start and update: the abort closes it the same way.
        ray.get(actor.start_weight_update.remote())
        ray.get(actor.abort_weight_update.remote())
        (state,) = ray.get(actor.weight_states.remote())
        assert not state["reload_open"] and not state["dirty"], state
        assert _score_diff(actor, student_hf) < 1e-4
        # 3. Part of the update lands (the embedding, a whole layer, and one
        # of the three q/k/v tensors of the first attention layer), then the
        # transfer fails: mixed weights, so no sampling until a full update.
        ray.get(actor.start_weight_update.remote())
        landed = [(n, t) for n, t in named
                  if n == "model.embed_tokens.weight" or n.endswith("layers.0.self_attn.q_proj.weight")]
        assert len(landed) == 2
        ray.get(actor.land.remote(landed))
        with pytest.raises(Exception, match="NCCL weight transfer not initialized"):
            ray.get(actor.update_weights.remote(info))
        (state,) = ray.get(actor.weight_states.remote())
        assert state["dirty"] and not state["reload_open"], state
        assert "NCCL weight transfer not initialized" in ray.get(actor.needs_full_update.remote())
        with pytest.raises(Exception, match="partially updated weights"):
            ray.get(actor.generate.remote([[5, 6, 7]]))
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)


def _nccl_sender(pool, timeout_s=60.0):
    """Learner rank 0 in a Ray actor with its own GPU (Ray gives the sampler
    another one): a NcclWeightSender to `pool`, pushing weights it is sent.
    Defined here so Ray ships the class by value (workers need not import
    the tests)."""

    class NcclSender:
        def __init__(self, pool, timeout_s: float):
            torch.cuda.set_device(0)  # the one GPU Ray made visible to this actor
            self.timeout_s = timeout_s
            self.release = threading.Event()
            self.sender = None
            self.connect(pool)

        def connect(self, pool) -> None:
            """A new group with every sampler of `pool` (after a restart the
            driver passes the pool again, as it does to the learners)."""
            import ray as _ray

            from learner.weight_sender import NcclWeightSender
            from rollout.host import free_port

            if self.sender is not None:
                self.release.set()  # the stalled iterator of an abandoned send
                self.sender.shutdown()
            self.sender = NcclWeightSender(pool, _ray.util.get_node_ip_address(), free_port(""),
                                           bucket_bytes=1 << 20, timeout_s=self.timeout_s)
            self.sender.connect()

        def push(self, version: int, named: list, stall_after: int | None = None) -> dict:
            """Send `named` as `version`; with `stall_after`, the learner's
            iterator stalls after that many tensors (a rank hung in a gather)."""
            from learner.weight_sender import specs_from_named as specs_of
            from rollout.weight_sync import WeightSyncError as Error

            def tensors():
                for i, item in enumerate(named):
                    if i == stall_after:
                        self.release.wait(600)
                    yield item

            try:
                self.sender.send(version, specs_of(named), tensors())
            except Error as e:
                return {"error": str(e), "stage": e.stage}
            return {"error": None, "stats": self.sender.last_stats}

    return ray.remote(NcclSender).options(num_gpus=1, max_concurrency=2).remote(pool, timeout_s)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "a real NCCL pair needs two GPUs (learner rank 0 and the sampler on different devices: NCCL refuses two "
    "ranks on one, 'Duplicate GPU detected'); the rest of the NCCL path runs in "
    "test_vllm_nccl_engine_failed_update_is_rolled_back and tests/unit/test_weight_update_failure.py"))


@pytest.mark.gpu
@TWO_GPUS
def test_nccl_push_serves_new_weights(ray_session, student_path, student_hf):
    """The weight-sync contract over vLLM's official NCCL engines (two GPUs)."""
    from rollout.pool import SamplerPool
    from tests.fixtures.sampler import sampler_configs

    rollout_cfg, student_cfg = sampler_configs(weight_sync_backend="nccl", gpu_memory_utilization=0.3)
    pool = SamplerPool.create(student_path, rollout_cfg, student_cfg, num_samplers=1)
    try:
        sender = _nccl_sender(pool)
        new = perturbed(student_hf, seed=3)
        out = ray.get(sender.push.remote(1, named_params(new)))
        assert out["error"] is None, out
        assert pool.weight_versions() == [1]
        assert max_score_diff(pool, new) < 1e-4
        ray.kill(sender)
    finally:
        pool.shutdown()


@pytest.mark.gpu
@TWO_GPUS
def test_nccl_push_that_times_out_restarts_the_stuck_sampler(ray_session, student_path, student_hf):
    """Learner rank 0 stalls in the middle of an NCCL push (a hung gather):
    past rollout.weight_sync_timeout_s the sender aborts its communicator and
    raises a "timeout" error; the sampler, stuck in its NCCL receive, says so
    and is the one the driver restarts; after the group is re-formed the next
    push is served."""
    from cluster.loop import release_stuck_sampler, samplers_to_restart, weight_sync_timed_out
    from rollout.pool import SamplerPool
    from tests.fixtures.sampler import sampler_configs

    rollout_cfg, student_cfg = sampler_configs(weight_sync_backend="nccl", gpu_memory_utilization=0.3,
                                               weight_sync_timeout_s=30.0)
    pool = SamplerPool.create(student_path, rollout_cfg, student_cfg, num_samplers=1)
    sender = None
    try:
        sender = _nccl_sender(pool, timeout_s=30.0)
        named = named_params(perturbed(student_hf, seed=4))
        out = ray.get(sender.push.remote(1, named, stall_after=len(named) // 2), timeout=300)
        assert out["stage"] == "timeout" and "did not finish within 30s" in out["error"], out
        assert weight_sync_timed_out(WeightSyncError(out["error"], out["stage"]))
        assert pool.weight_versions() == [0]
        bad = samplers_to_restart(pool)
        assert list(bad) == [0] and bad[0].startswith("stuck in a weight receive"), bad
        release_stuck_sampler(pool, 0)
        pool.restart(0)
        ray.get(sender.connect.remote(pool), timeout=300)
        new = perturbed(student_hf, seed=5)
        out = ray.get(sender.push.remote(1, named_params(new)), timeout=300)
        assert out["error"] is None, out
        assert pool.weight_versions() == [1]
        assert max_score_diff(pool, new) < 1e-4
    finally:
        if sender is not None:
            ray.kill(sender)
        pool.shutdown()
