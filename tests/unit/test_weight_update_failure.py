"""The engine-agnostic parts of a failed weight update (no Ray, no vLLM engine):

* `call_with_deadline` (learner/weight_sender.py): the bound on a send;
* `NcclWeightSender`'s failure handling, around a stand-in for vLLM's
  `NCCLTrainerWeightTransferEngine` that drives the client the way vLLM's
  `send_weights` does (start, update on a side thread, pull the source,
  finish): NCCL itself needs GPUs (tests/e2e/test_weight_sync.py::test_nccl_*);
* `layerwise_reload_state` / `abort_layerwise_reload` (rollout/weight_receiver.py)
  on vLLM's real layerwise-reload functions over a small torch module: what
  the samplers' NCCL engine leaves behind after a failed receive, and how it
  is rolled back;
* `weight_sync_timed_out` (cluster/loop.py).

    .venv/bin/python -m pytest tests/unit/test_weight_update_failure.py -q
"""

import threading
import time

import pytest
import torch

from learner.weight_sender import NcclWeightSender, _round_source_cls, call_with_deadline, specs_from_named
from rollout.weight_sync import WeightSyncError


def test_call_with_deadline_returns_or_raises_what_the_call_did():
    assert call_with_deadline(lambda: 41 + 1, 5.0, "a sum") == 42
    with pytest.raises(KeyError, match="boom"):
        call_with_deadline(lambda: {}["boom"], 5.0, "a lookup")


def test_call_with_deadline_aborts_a_call_that_overruns():
    release = threading.Event()
    aborted = []

    def on_timeout():
        aborted.append(time.monotonic())
        release.set()  # what ncclCommAbort does to a pending kernel

    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"the transfer did not finish within 0.2s; it was aborted$") as ei:
        call_with_deadline(lambda: release.wait(60), 0.2, "the transfer", on_timeout, grace_s=5.0)
    assert ei.value.stage == "timeout"
    assert len(aborted) == 1 and aborted[0] - t0 >= 0.2
    assert time.monotonic() - t0 < 5.0  # it did not wait out the grace: the call ended at the abort


def test_call_with_deadline_gives_up_on_a_call_that_ignores_the_abort():
    stuck = threading.Event()
    with pytest.raises(WeightSyncError, match=r"still blocked 0.1s after the abort"):
        call_with_deadline(lambda: stuck.wait(60), 0.1, "the transfer", lambda: None, grace_s=0.1)
    # The blocked call is left on a daemon thread: it never holds up the exit.
    left = [t for t in threading.enumerate() if t.name == "opd-deadline"]
    assert left and all(t.daemon for t in left)
    stuck.set()


class FakeClient:
    """The sampler pool's control plane, recording calls."""

    def __init__(self, problems=()):
        self.calls = []
        self.problems = list(problems)
        self.receiving = threading.Event()

    def total_workers(self):
        return 1

    def validate_update(self, info):
        self.calls.append("validate")
        return self.problems

    def start_weight_update(self):
        self.calls.append("start")

    def update_weights(self, info):
        self.calls.append("update")
        self.receiving.set()

    def finish_weight_update(self, weight_version=None):
        self.calls.append(f"finish v{weight_version}")

    def abort_weight_update(self):
        self.calls.append("abort")


class FakeEngine:
    """Stands in for vLLM's NCCLTrainerWeightTransferEngine (nccl_engine.py
    send_weights / shutdown): start, update on a side thread, pull every
    tensor of the source (`consume`, which may block like a broadcast
    waiting for a peer), finish. `shutdown` is the ncclCommAbort: it ends a
    pending broadcast with an error."""

    def __init__(self, client, source, consume=None, fail_before_broadcast=False):
        self.client, self.source = client, source
        self.consume = consume or (lambda name, t: None)
        self.fail_before_broadcast = fail_before_broadcast
        self.aborted = threading.Event()
        self.shutdowns = 0
        self.pulled = []

    def send_weights(self):
        self.client.start_weight_update()
        if self.fail_before_broadcast:
            raise RuntimeError("start_weight_update failed on sampler 1")
        threading.Thread(target=self.client.update_weights, args=({},), daemon=True).start()
        for name, t in self.source:
            self.pulled.append(name)
            self.consume(name, t)
            if self.aborted.is_set():
                raise RuntimeError("NCCL error: communicator aborted")
        self.client.finish_weight_update()

    def shutdown(self):
        self.shutdowns += 1
        self.aborted.set()


def make_sender(client, timeout_s=5.0, **engine_kwargs):
    sender = NcclWeightSender(client, "127.0.0.1", 1, timeout_s=timeout_s)
    source = _round_source_cls()()
    source.device = torch.device("cpu")  # the current CUDA device on a GPU
    sender._source, sender._engine = source, FakeEngine(sender.client, source, **engine_kwargs)
    return sender


def model_named(n=4):
    torch.manual_seed(0)
    return [(f"w{i}", torch.randn(3, 2)) for i in range(n)]


def test_nccl_sender_drives_one_update_and_records_its_version():
    client = FakeClient()
    sender = make_sender(client)
    named = model_named()
    sender.send(7, specs_from_named(named), iter(named))
    assert client.calls == ["validate", "start", "update", "finish v7"]
    assert sender._engine.pulled == [n for n, _ in named]
    assert sender.last_stats["sync/bytes"] == sum(t.numel() * 4 for _, t in named)


def test_nccl_sender_rejects_an_invalid_update_before_any_sampler_opens_it():
    client = FakeClient(problems=["unknown parameter 'w9'"])
    sender = make_sender(client)
    named = model_named()
    with pytest.raises(WeightSyncError, match=r"weight update v1 rejected: unknown parameter 'w9'") as ei:
        sender.send(1, specs_from_named(named), iter(named))
    assert ei.value.stage == "validate" and client.calls == ["validate"]
    assert sender._engine is not None  # the group is untouched


def test_nccl_sender_past_its_deadline_aborts_the_group_and_the_open_updates():
    """A sampler never joins the broadcast: the sender's deadline passes, it
    aborts its communicator (which ends its own pending broadcast), stops
    pulling tensors from the learner, closes the update on the samplers and
    raises a "timeout" error; the next send forms a new group."""
    client = FakeClient()
    engine_box = {}

    def consume(name, t):
        if name == "w1":
            engine_box["engine"].aborted.wait(60)  # the broadcast waits for a peer until the abort

    sender = make_sender(client, timeout_s=0.3, consume=consume)
    engine = engine_box["engine"] = sender._engine
    named = model_named()
    pulled_from_learner = []

    def learner_iter():
        for item in named:
            pulled_from_learner.append(item[0])
            yield item

    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"weight update v3 over NCCL \(rollout.weight_sync_timeout_s\) did not "
                                              r"finish within 0.3s; it was aborted\. The NCCL group was aborted") as ei:
        sender.send(3, specs_from_named(named), learner_iter())
    assert ei.value.stage == "timeout"
    assert time.monotonic() - t0 < 5.0
    assert engine.shutdowns == 1 and sender._engine is None
    assert client.calls[-1] == "abort" and "finish v3" not in client.calls
    assert pulled_from_learner == ["w0", "w1"]  # the rest is the learner's to drain


def test_nccl_sender_tears_down_a_group_whose_broadcast_failed():
    client = FakeClient()

    def consume(name, t):
        if name == "w2":
            raise RuntimeError("NCCL error: remote process exited")

    sender = make_sender(client, consume=consume)
    engine = sender._engine
    named = model_named()
    with pytest.raises(RuntimeError, match="remote process exited"):
        sender.send(4, specs_from_named(named), iter(named))
    assert engine.shutdowns == 1 and sender._engine is None  # vLLM: the group is unusable after this
    assert client.calls[-1] == "abort"


def test_nccl_sender_keeps_the_group_when_the_update_failed_before_the_broadcast():
    client = FakeClient()
    sender = make_sender(client, fail_before_broadcast=True)
    engine = sender._engine
    named = model_named()
    with pytest.raises(RuntimeError, match="start_weight_update failed on sampler 1"):
        sender.send(5, specs_from_named(named), iter(named))
    # Samplers that did open the update are closed; no NCCL call was made, so the group stays.
    assert client.calls == ["validate", "start", "abort"]
    assert engine.shutdowns == 0 and sender._engine is engine


# ---------------------------------------------------- vLLM's layerwise reload


def reloadable_model():
    """A small module prepared the way vLLM's loader prepares a model
    (`record_metadata_for_reloading`, done when it loads one)."""
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    record_metadata_for_reloading(model)
    return model


def receive(model, name: str, value: torch.Tensor) -> None:
    """What a receiving engine's `model.load_weights` does for one tensor
    inside the reload: call the parameter's (wrapped) weight loader."""
    layer_name, param_name = name.rsplit(".", 1)
    param = getattr(model.get_submodule(layer_name), param_name)
    param.weight_loader(param, value)


def test_a_reload_that_received_nothing_rolls_back_to_the_old_weights():
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    from rollout.weight_receiver import abort_layerwise_reload, layerwise_reload_state

    model = reloadable_model()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    assert layerwise_reload_state(model) == (False, False)
    assert abort_layerwise_reload(model, None) is False  # nothing open: nothing to do
    initialize_layerwise_reload(model)  # vLLM's NCCL engine does this in start_weight_update
    assert model[0].weight.is_meta  # the model cannot run now
    assert layerwise_reload_state(model) == (True, False)
    assert abort_layerwise_reload(model, None) is False
    assert layerwise_reload_state(model) == (False, False)
    assert all(torch.equal(old[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(torch.ones(1, 4)), model(torch.ones(1, 4)))  # runs again


def test_a_reload_that_received_part_of_an_update_is_reported_mixed():
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    from rollout.weight_receiver import abort_layerwise_reload, layerwise_reload_state

    model = reloadable_model()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    initialize_layerwise_reload(model)
    receive(model, "0.weight", torch.full((3, 4), 2.0))
    assert layerwise_reload_state(model) == (True, True)  # buffered in layer 0, not processed yet
    receive(model, "0.bias", torch.full((3,), 2.0))
    assert not model[0].weight.is_meta and model[2].weight.is_meta  # layer 0 processed
    assert layerwise_reload_state(model) == (True, True)
    assert abort_layerwise_reload(model, None) is True
    assert layerwise_reload_state(model) == (False, False)
    # Mixed: layer 0 holds the update, layer 2 its old weights.
    assert torch.equal(model[0].weight, torch.full((3, 4), 2.0))
    assert torch.equal(model[2].weight, old["2.weight"]) and torch.equal(model[2].bias, old["2.bias"])


def test_weight_sync_timed_out_reads_the_stage_through_a_ray_wrapper():
    from cluster.loop import weight_sync_timed_out

    class Wrapped(Exception):  # what ray.get raises for an actor's exception: the original is .cause
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    assert weight_sync_timed_out(WeightSyncError("v3 did not finish", "timeout"))
    assert weight_sync_timed_out(Wrapped(WeightSyncError("v3 did not finish", "timeout")))
    assert not weight_sync_timed_out(Wrapped(WeightSyncError("rejected", "validate")))
    assert not weight_sync_timed_out(TimeoutError("a learner rank hangs"))


def test_a_lost_rendezvous_port_is_recognised_and_nothing_else():
    """LearnerGroup.create retries the learners' rendezvous on a new port only
    when rank 0 lost its port (the text Ray carries from torch.distributed)."""
    from learner.group import port_taken

    seen = ("ray.exceptions.ActorDiedError: The actor died because of an error raised in its creation task, "
            "ray::LearnerWorker.__init__() torch.distributed.DistNetworkError: The server socket has failed to "
            "listen on any local network address. port: 45331, useIpv6: false, code: -98, name: EADDRINUSE, "
            "message: address already in use")
    assert port_taken(RuntimeError(seen))
    assert not port_taken(RuntimeError("DistNetworkError: connection refused by 10.0.0.2:29500"))
    assert not port_taken(TimeoutError("learner call did not finish on all 2 learner ranks within 600s"))
