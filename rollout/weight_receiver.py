"""Receiving side of weight sync inside each vLLM sampler worker (CPU transports).

`GlooWeightTransferEngine` ("opd_gloo"), a vLLM `WeightTransferEngine` (the
same lifecycle as vLLM's own `NCCLWeightTransferEngine`), registered in
vLLM's `WeightTransferEngineFactory` when this module is imported: it
receives over a private gloo process group (rank 0 = learner rank 0, ranks
1.. = every sampler worker) the control messages and the buckets' bytes.

The sampler passes `worker_extension_cls="rollout.weight_receiver.WeightSyncWorkerExtension"`
to `LLM(...)`: vLLM imports this module in every worker process before
`load_model` creates the engine, so the registration takes effect there.

One update, as the worker sees it (the sampler actor drives it through
`llm.collective_rpc` with vLLM's method names):

1. `start_weight_update()`: only opens the session; no weight is touched.
2. `update_weights(GlooUpdateInfo as dict)`:
   a. validate names / shapes / dtypes against the model's checkpoint layout
      (from its HF config, built on the meta device);
   b. all-reduce a reject flag over the group: if ANY participant rejects,
      everyone raises before a single weight is touched (and the sender does
      not hang waiting for a receiver that gave up);
   c. `initialize_layerwise_reload(model)`, then per bucket: receive the
      [status, nbytes] header, then the bucket's bytes (a broadcast into a
      fresh buffer), `unpack_bucket`, `model.load_weights` (layers are
      processed as soon as they are complete; until then vLLM keeps views of
      the buffer).
3. `finish_weight_update()`: `finalize_layerwise_reload`.

Failure after (b): the layerwise state is finalized so the model is usable
again, but if any bucket was already loaded the weights are a mix of old and
new: the engine reports `dirty=True` (`WeightSyncWorkerExtension.opd_weight_state`)
and the sampler actor refuses to generate until a full update succeeds. A
failure before any bucket was loaded restores the old weights exactly.

On GPU the samplers run vLLM's own `NCCLWeightTransferEngine`, which opens
vLLM's layerwise reload in `start_weight_update` and leaves it open when a
receive fails. The sampler then calls `WeightSyncWorkerExtension.
opd_abort_weight_update`, which rolls that reload back with vLLM's
`finalize_layerwise_reload` and reports the same `dirty` semantics
(`layerwise_reload_state` reads vLLM's bookkeeping to tell whether any
weight had landed). A worker stuck inside an NCCL receive whose sender gave
up cannot be reached by any call: its sampler is restarted instead
(rollout/sampler.py, cluster/loop.py).
"""

from __future__ import annotations

import logging

import torch

from rollout.weight_sync import (
    GLOO_BACKEND_NAME,
    HEADER_OK,
    GlooInitInfo,
    GlooUpdateInfo,
    WeightSyncError,
    check_update_specs,
    gloo_allreduce_sum,
    gloo_broadcast,
    open_gloo_group,
    unpack_bucket,
)
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

logger = logging.getLogger(__name__)


class QuietRotaryReload(logging.Filter):
    """Drops one record of vLLM's layerwise reload: "RotaryEmbedding: Failed
    to load weights", logged at every update of an onednn-layout CPU sampler
    (150 times in `make demo`). The layer's only tensor is its cos/sin cache,
    a buffer no checkpoint or update carries, and vLLM puts it back unchanged
    (vllm/model_executor/model_loader/reload/layerwise.py,
    finalize_layerwise_processing). The same message for any other layer
    still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and record.args[0] == "RotaryEmbedding")


# Installed where the reload runs: this module is imported in every process
# whose vLLM worker receives weights.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(QuietRotaryReload())


def layerwise_reload_state(model) -> tuple[bool, bool]:
    """(open, loaded): whether vLLM's layerwise reload of `model` is in
    progress (`initialize_layerwise_reload` ran, `finalize_layerwise_reload`
    did not), and if so whether any weight of the update has landed. Read
    from vLLM's own bookkeeping (model_loader/reload/layerwise.py
    `LAYERWISE_INFO`): initializing gives every module a `load_numel_total`
    (`can_load()`); a layer whose weights have all arrived is processed
    (new weights copied into its tensors) and reset, so while the reload is
    open a layer with loadable tensors that cannot load any more was
    processed, and one that can but holds `load_numel > 0` has buffered
    weights that finalizing would process."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.utils import get_layer_size

    pending = buffered = processed = False
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            pending = True
            buffered = buffered or info.load_numel > 0
        elif get_layer_size(layer) > 0:
            processed = True
    return pending, pending and (buffered or processed)


class _QuietFailedLoads(logging.Filter):
    """Drops vLLM's per-layer "Failed to load weights" while an update is
    rolled back (every layer that received nothing says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "%s: Failed to load weights"


def abort_layerwise_reload(model, model_config) -> bool:
    """Leave an open layerwise reload of `model` (no-op when none is open)
    with vLLM's own `finalize_layerwise_reload`: every layer that received
    nothing gets its old tensors back (`_place_kernel_tensors`), a layer that
    received part of its weights is processed with them. Returns True when
    any weight of the aborted update had landed: the model then holds a mix
    of old and new weights; False: the old weights are back exactly."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    is_open, loaded = layerwise_reload_state(model)
    if not is_open:
        return False
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    quiet = _QuietFailedLoads()
    log.addFilter(quiet)
    try:
        finalize_layerwise_reload(model, model_config)
    finally:
        log.removeFilter(quiet)
    return loaded


def checkpoint_layout(hf_config) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(name -> full shape of every loadable HF checkpoint weight, names a full
    update must contain) for a model config, without allocating weights
    (the model is built on the meta device). Tied weights: both names are
    loadable, only the owning one is required (what `named_parameters` gives)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()
                if t.is_floating_point() and name in dict(model.named_parameters(remove_duplicate=False))}
    required = [name for name, _ in model.named_parameters()]
    return expected, required


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """vLLM weight-transfer engine receiving bucketed broadcasts over gloo (CPU)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._store = None
        self._group = None
        self._layout: tuple[dict[str, tuple[int, ...]], list[str]] | None = None
        self._reload_open = False  # vLLM's layerwise reload is open (until finish or abort)
        # True when a failed update loaded some buckets: weights are mixed.
        self.dirty = False
        self.last_error: str | None = None

    # -- helpers ------------------------------------------------------------

    def layout(self) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        if self._layout is None:
            self._layout = checkpoint_layout(self.model_config.hf_config)
        return self._layout

    def check(self, info: GlooUpdateInfo) -> list[str]:
        try:
            info.validate()
        except ValueError as e:
            return [str(e)]
        expected, required = self.layout()
        return check_update_specs(info.specs(), expected, required)

    def _group_rank(self, rank_offset: int) -> int:
        pc = self.parallel_config
        return pc.data_parallel_index * pc.world_size + pc.rank + rank_offset

    # -- vLLM lifecycle -----------------------------------------------------

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()
        rank = self._group_rank(init_info.rank_offset)
        if not 0 < rank < init_info.world_size:
            raise WeightSyncError(f"worker rank {rank} (rank_offset {init_info.rank_offset}) is outside the "
                                  f"weight-sync group of size {init_info.world_size}; world_size must be 1 + "
                                  f"the number of sampler workers", stage="init")
        self._store, self._group = open_gloo_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size,
            init_info.timeout_s, init_info.group_name)
        logger.info("opd_gloo weight receiver joined %s:%s as rank %d/%d", init_info.master_address,
                    init_info.master_port, rank, init_info.world_size)

    def start_weight_update(self) -> None:
        # Nothing is touched until update_weights has validated the update
        # (initialize_layerwise_reload puts every layer on the meta device).
        if self._reload_open:
            self._abort_reload()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self._group is None:
            raise WeightSyncError("opd_gloo weight transfer is not initialized: call "
                                  "init_weight_transfer_engine first", stage="init")
        problems = self.check(update_info)
        flag = torch.tensor([1 if problems else 0], dtype=torch.int64)
        gloo_allreduce_sum(self._group, flag, "the update's accept/reject vote")
        if problems:
            self.last_error = "; ".join(problems)
            raise WeightSyncError(f"weight update v{update_info.version} rejected, nothing was modified: "
                                  + "; ".join(problems), stage="validate")
        if flag.item() != 0:
            raise WeightSyncError(f"weight update v{update_info.version} was rejected by another participant "
                                  "(see its error); nothing was modified", stage="validate")

        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._reload_open = True
        loaded_any = False
        try:
            header = torch.zeros(2, dtype=torch.int64)
            buckets = update_info.buckets()
            for b, specs in enumerate(buckets):
                nbytes = sum(s.nbytes for s in specs)
                gloo_broadcast(self._group, header, f"the header of bucket {b}")
                status, sent = int(header[0]), int(header[1])
                if status != HEADER_OK:
                    raise WeightSyncError(f"the sender aborted weight update v{update_info.version} at bucket {b} "
                                          f"of {len(buckets)}", stage="transfer")
                if sent != nbytes:
                    raise WeightSyncError(f"bucket {b} header says {sent} bytes, the update info describes {nbytes}",
                                          stage="transfer")
                # A fresh buffer per bucket: layerwise reload keeps views of it
                # until every weight of the layer has arrived.
                flat = torch.empty(nbytes, dtype=torch.uint8)
                gloo_broadcast(self._group, flat, f"bucket {b} ({nbytes} bytes)")
                with torch.no_grad():
                    # Layerwise: buffered until a layer is complete, then processed.
                    self.model.load_weights(list(unpack_bucket(flat, specs)))
                del flat
                loaded_any = True
        except BaseException as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self._abort_reload(dirty=loaded_any)
            raise

    def finish_weight_update(self) -> None:
        if not self._reload_open:
            raise WeightSyncError("finish_weight_update without a received update (update_weights failed or "
                                  "was never called)", stage="finish")
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        self._reload_open = False
        self.dirty = False
        self.last_error = None

    def _abort_reload(self, dirty: bool = True) -> None:
        """Leave the layerwise-reload state (layers that received nothing get
        their old tensors back) and record whether weights are now mixed."""
        try:
            if self._reload_open:
                from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

                finalize_layerwise_reload(self.model, self.model_config)
        finally:
            self._reload_open = False
            self.dirty = self.dirty or dirty

    def shutdown(self) -> None:
        self._group = None
        self._store = None


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called by the
    sampler actor through `llm.collective_rpc("opd_...")`."""

    def opd_weight_state(self) -> dict:
        """{"dirty": weights mixed by a failed update (opd_gloo: since the
        last finished update; vLLM's own engines, e.g. NCCL: by the last
        aborted one, see opd_abort_weight_update), "last_error": str|None,
        "reload_open": vLLM's layerwise reload is in progress (an update is
        being received, or a failed one was not rolled back yet),
        "engine": the weight-transfer engine's class name}."""
        engine = getattr(self, "weight_transfer_engine", None)
        ours = isinstance(engine, GlooWeightTransferEngine)
        model = engine.model if engine is not None else self.model_runner.model
        return {"dirty": bool(engine.dirty if ours else getattr(self, "_opd_dirty", False)),
                "last_error": engine.last_error if ours else getattr(self, "_opd_last_error", None),
                "reload_open": layerwise_reload_state(model)[0],
                "engine": type(engine).__name__ if engine is not None else None}

    def opd_check_update(self, update_info: dict) -> list[str]:
        """Problems of an update against this worker's model (empty = valid);
        touches nothing. Used to pre-validate before an NCCL transfer."""
        try:
            info = GlooUpdateInfo(**update_info)
        except TypeError as e:
            return [f"malformed update info: {e}"]
        if getattr(self, "_opd_layout", None) is None:
            self._opd_layout = checkpoint_layout(self.model_runner.model_config.hf_config)
        expected, required = self._opd_layout
        try:
            info.validate()
        except ValueError as e:
            return [str(e)]
        return check_update_specs(info.specs(), expected, required)

    def opd_reject_update(self, reason: str) -> None:
        """Join the accept vote of an update this worker cannot take (its
        sampler could not open it, see SamplerActor.update_weights(fused=True))
        with a reject: the sender and every other worker then raise before
        any weight is touched, instead of waiting for this one."""
        engine = getattr(self, "weight_transfer_engine", None)
        group = getattr(engine, "_group", None)
        if group is None:
            raise WeightSyncError(f"cannot vote reject ({reason}): this worker is not in a weight-sync group", "init")
        gloo_allreduce_sum(group, torch.tensor([1], dtype=torch.int64), "the update's accept/reject vote")

    def opd_abort_weight_update(self, reason: str | None = None) -> dict:
        """Close whatever a failed or abandoned update left open, and return
        `opd_weight_state()`. The sampler calls it after any failed step of
        an update, and for a sender that gave an update up (never while this
        worker is inside a receive: the call would run beside it, or wait
        behind it forever).

        opd_gloo undoes its own layerwise state when a receive fails;
        here it only closes a session whose sender died after the receive.
        vLLM's own engines (the NCCL engine) run `initialize_layerwise_reload`
        in `start_weight_update`, and vLLM's worker, when `update_weights`
        raises, only clears its session flag (gpu_worker.py `update_weights`):
        every layer is left on the meta device and generating would fail.
        That reload is rolled back with vLLM's `finalize_layerwise_reload`
        (`abort_layerwise_reload`): the old weights come back exactly when
        nothing had landed, else the weights are mixed and `dirty` says so
        (the sampler then refuses to sample until a full update succeeds).
        `reason`: the failure, kept as `last_error` when weights are mixed."""
        engine = getattr(self, "weight_transfer_engine", None)
        if isinstance(engine, GlooWeightTransferEngine):
            if engine._reload_open:
                engine._abort_reload(dirty=True)
                engine.last_error = engine.last_error or reason
        elif engine is not None:
            try:
                mixed = abort_layerwise_reload(engine.model, engine.model_config)
            except Exception as e:  # noqa: BLE001 - the model's state is unknown: treat it as mixed
                mixed, reason = True, f"{reason}; rolling back vLLM's layerwise reload failed: {e}"
            self._opd_dirty = mixed
            self._opd_last_error = (reason or "an aborted weight update had loaded some weights") if mixed else None
            engine.reset_weight_update_target()
        self._weight_update_active = False
        return self.opd_weight_state()


if GLOO_BACKEND_NAME not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine(GLOO_BACKEND_NAME, GlooWeightTransferEngine)
