"""Receiving side of weight sync inside each vLLM sampler worker (CPU transports).

Two vLLM `WeightTransferEngine`s (the same lifecycle as vLLM's own
`NCCLWeightTransferEngine`), registered in vLLM's `WeightTransferEngineFactory`
when this module is imported:

* `GlooWeightTransferEngine` ("opd_gloo"): receives over a private gloo
  process group (rank 0 = learner rank 0, ranks 1.. = every sampler worker):
  control messages and the buckets' bytes.
* `ShmWeightTransferEngine` ("opd_shm"): the same group carries only the
  control messages; a bucket's bytes are read in place from the learner's
  shared-memory region (a /dev/shm file named by the update, mapped once and
  kept while its name stays the same). Updates that name no region come over
  gloo as above, so one sampler serves either sender.

The sampler passes `worker_extension_cls="rollout.weight_receiver.WeightSyncWorkerExtension"`
to `LLM(...)`: vLLM imports this module in every worker process before
`load_model` creates the engine, so the registration takes effect there.

One update, as the worker sees it (the sampler actor drives it through
`llm.collective_rpc` with vLLM's method names):

1. `start_weight_update()`: only opens the session; no weight is touched.
2. `update_weights(GlooUpdateInfo as dict)`:
   a. validate names / shapes / dtypes against the model's checkpoint layout
      (from its HF config, built on the meta device); shm: map the region
      and check its token (a sampler on another node, or behind another
      /dev/shm, rejects here with the fix in the message);
   b. all-reduce a reject flag over the group: if ANY participant rejects,
      everyone raises before a single weight is touched (and the sender does
      not hang waiting for a receiver that gave up);
   c. `initialize_layerwise_reload(model)`, then per bucket: receive the
      [status, nbytes] header, then the bucket's bytes (gloo: a broadcast into
      a fresh buffer; shm: a view of the region), `unpack_bucket`,
      `model.load_weights` (layers are processed as soon as they are complete;
      until then vLLM keeps the views, which is why the region is never
      rewritten before this update finished everywhere).
3. `finish_weight_update()`: `finalize_layerwise_reload`.

With `rollout.cpu_gemm=plain` the engine is loaded through the
"opd_cpu_plain_gemm" model loader (below): every linear layer keeps its plain
weight and multiplies with torch's F.linear, so step (c) copies each bucket
straight into the live parameters with the model's own `load_weights` (one
copy per byte) instead of vLLM's layerwise reload (which re-materializes each
layer and re-packs every linear weight for oneDNN: 4-7x a memcpy on CPU).
The first in-place load of each name is recorded and later ones replayed as
plain copies (rollout/copy_plan.py: no walk through vLLM's loaders), with
rollout.weight_load_threads torch threads (vLLM pins the engine to fewer).

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

import dataclasses
import logging
import os

import torch

from rollout.copy_plan import CopyPlan
from rollout.weight_sync import (
    GLOO_BACKEND_NAME,
    HEADER_OK,
    SHM_BACKEND_NAME,
    GlooInitInfo,
    GlooUpdateInfo,
    WeightSyncError,
    check_update_specs,
    gloo_allreduce_sum,
    gloo_broadcast,
    layout_id,
    open_gloo_group,
    open_region,
    param_slots,
    plan_param_region,
    torch_threads,
    unpack_bucket,
)
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

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
        self._reload_open = False  # an update session is open (until finish or abort)
        self._layerwise_open = False  # ... and it holds vLLM's layerwise-reload state
        # True when a failed update loaded some buckets: weights are mixed.
        self.dirty = False
        self.last_error: str | None = None
        self._load_threads: int | None = None
        self._copy_plan: CopyPlan | None = None  # in-place loads, replayed (plain GEMM layout)
        self._receivers = 1  # sampler workers in the group (they all load at once)

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
        problems = check_update_specs(info.specs(), expected, required)
        if info.shm_path is not None:
            problems.append(f"the learner sends through shared memory ({info.shm_path}) but this sampler's "
                            f"weight-transfer engine is {GLOO_BACKEND_NAME}: start the samplers with "
                            "rollout.weight_sync_backend=shm or auto, or send with gloo")
        return problems

    def bucket_bytes(self, info: GlooUpdateInfo, b: int, nbytes: int) -> torch.Tensor:
        """Bucket b's bytes (uint8, `nbytes`), after its header said it is ready."""
        # A fresh buffer per bucket: layerwise reload keeps views of it
        # until every weight of the layer has arrived.
        flat = torch.empty(nbytes, dtype=torch.uint8)
        gloo_broadcast(self._group, flat, f"bucket {b} ({nbytes} bytes)")
        return flat

    def _load_in_place(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """`model.load_weights` of a plain-GEMM model (its weight loaders copy
        into the live parameters), replayed as plain copies once seen
        (rollout.copy_plan), with `load_threads()` torch threads. vLLM
        pins a CPU engine's torch to fewer threads than the process may use
        (one on a 2-core box, which halves a copy's speed) and disables
        `torch.set_num_threads` after pinning; the engine serves nothing
        during an update, so the copy may use more, and the engine's own
        count is restored after."""
        with torch_threads(self.load_threads()):
            if self._copy_plan is None:
                self._copy_plan = CopyPlan([*self.model.parameters(), *self.model.buffers()])
            self._copy_plan.load(self.model.load_weights, weights)

    def load_threads(self) -> int:
        """rollout.weight_load_threads (passed as OPD_WEIGHT_LOAD_THREADS by
        the sampler); 0 or unset = the cores this process may run on, shared
        with the group's other receivers (they load at the same time, and
        with shm they are all on this node): one thread each on 2 cores with
        2 samplers, 2 threads with one."""
        if self._load_threads is None:
            n = int(os.environ.get(LOAD_THREADS_ENV, "0") or 0)
            self._load_threads = n if n > 0 else max(1, len(os.sched_getaffinity(0)) // self._receivers)
        return self._load_threads

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
        self._receivers, self._load_threads = init_info.world_size - 1, None
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

        shared = update_info.shm_layout is not None
        in_place = plain_gemm_loaded(self.model)
        if not shared:
            self._unshare()
        if not in_place and not shared:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
            self._layerwise_open = True
        self._reload_open = True
        # Shared mode: the sender writes into the parameters themselves once
        # the vote passed, so once they are the region, any failure mixes them.
        loaded_any = shared and self._sharing(update_info)
        try:
            header = torch.zeros(2, dtype=torch.int64)
            # Shared mode: one header for the whole update (the sender writes
            # every bucket into our parameters before it).
            buckets = [update_info.specs()] if shared else update_info.buckets()
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
                if shared:
                    continue  # written into the shared parameters by the sender
                flat = self.bucket_bytes(update_info, b, nbytes)
                with torch.no_grad():
                    if in_place:
                        # Copied into the live parameters by their weight loaders.
                        self._load_in_place(list(unpack_bucket(flat, specs)))
                    else:
                        # Layerwise: buffered until a layer is complete, then processed.
                        self.model.load_weights(list(unpack_bucket(flat, specs)))
                del flat
                loaded_any = True
            if shared:
                self._share(update_info)
        except BaseException as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self._abort_reload(dirty=loaded_any)
            raise

    # Shared mode hooks (ShmWeightTransferEngine implements them).
    def _sharing(self, info: GlooUpdateInfo) -> bool:
        return False

    def _share(self, info: GlooUpdateInfo) -> None:
        raise WeightSyncError(f"this sampler's weight-transfer engine is {GLOO_BACKEND_NAME}: it cannot keep its "
                              "weights in a shared-memory region", stage="transfer")

    def _unshare(self) -> None:
        pass

    def finish_weight_update(self) -> None:
        if not self._reload_open:
            raise WeightSyncError("finish_weight_update without a received update (update_weights failed or "
                                  "was never called)", stage="finish")
        if self._layerwise_open:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            self._layerwise_open = False
        self._reload_open = False
        self.dirty = False
        self.last_error = None

    def _abort_reload(self, dirty: bool = True) -> None:
        """Leave the layerwise-reload state (layers that received nothing get
        their old tensors back) and record whether weights are now mixed."""
        try:
            if self._layerwise_open:
                from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

                finalize_layerwise_reload(self.model, self.model_config)
        finally:
            self._reload_open = self._layerwise_open = False
            self.dirty = self.dirty or dirty

    def shutdown(self) -> None:
        self._group = None
        self._store = None


class ShmWeightTransferEngine(GlooWeightTransferEngine):
    """vLLM weight-transfer engine reading the buckets in place from the
    learner's shared-memory region; control messages (vote, headers) over
    the gloo group. Accepts plain gloo updates too (no region named).

    Shared mode (an update with `shm_layout`): the region is laid out like
    this worker's parameters (rollout.copy_plan.param_layout, reported by
    `shared_layout`); the sender writes every tensor straight into it, and
    at the end of the first such update the worker rebinds the parameters
    that receive copies to their slots (`param.data = slot`). Every worker
    with the same layout does the same, so the samplers on this node then
    hold one copy of the weights, and later updates into the same region
    load nothing here. vLLM's plain-GEMM layers read `layer.weight` at every
    call, so the rebind is seen by the next forward. A packed update (the
    learner re-formed the group, or shared mode is off) first gives the
    parameters private copies again (`_unshare`)."""

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._region_key: tuple[str, str, int] | None = None
        self._region = None  # uint8 tensor over the mapping (it keeps the mmap alive)
        # Shared mode: the region mapped for the update in flight, and the one adopted.
        # (region key, its mapping, layout, layout id)
        self._shared_next: tuple[tuple[str, str, int], torch.Tensor, dict, str] | None = None
        self._shared_key: tuple[str, str, int] | None = None
        self._shared_id: str | None = None
        self._shared_params: list[torch.nn.Parameter] = []
        self._layout_cache: tuple[tuple, dict | None, str | None] | None = None

    def shared_layout(self, names: list[str]) -> tuple[dict | None, str | None]:
        """(layout of the parameters the update `names` is copied into, None)
        or (None, why this worker cannot share them)."""
        if not plain_gemm_loaded(self.model):
            return None, "the sampler loads updates through vLLM's layerwise reload (rollout.cpu_gemm=onednn)"
        if self._copy_plan is None:
            return None, "0 names are not replayed yet (no in-place load happened)"
        key = (tuple(names), self._copy_plan.size(), self._copy_plan.refused)
        if self._layout_cache is None or self._layout_cache[0] != key:
            from rollout.copy_plan import param_layout

            self._layout_cache = (key, *param_layout(self._copy_plan, self.model.named_parameters(), names))
        return self._layout_cache[1], self._layout_cache[2]

    def check(self, info: GlooUpdateInfo) -> list[str]:
        shm_path = info.shm_path
        if shm_path is None:
            return super().check(info)
        problems = super().check(dataclasses.replace(info, shm_path=None, shm_layout=None))
        try:
            info.validate()
            if info.shm_layout is None:
                self._map(shm_path, info.shm_token, info.shm_bytes)
            else:
                problems += self._check_shared(info)
        except (ValueError, WeightSyncError) as e:
            problems.append(str(e))
        return problems

    def _check_shared(self, info: GlooUpdateInfo) -> list[str]:
        key = (info.shm_path, info.shm_token, info.shm_bytes)
        if key == self._shared_key:
            mine = self._shared_id  # the region these parameters already live in
        else:
            layout, why = self.shared_layout(info.names)
            if layout is None:
                return [f"the learner writes into a shared parameter region but this worker cannot share its "
                        f"parameters: {why}; set rollout.shm_shared_weights=false"]
            mine = layout_id(layout)
            need = plan_param_region(layout)[1]
            if need > info.shm_bytes:
                return [f"the shared parameter region holds {info.shm_bytes} bytes, this worker's parameters "
                        f"need {need}"]
            # Mapped at its first update: the sender unlinks the file once every
            # worker voted, so if that update failed, the next one into the
            # same region finds it only through this mapping.
            mapped = self._shared_next[1] if self._shared_next and self._shared_next[0] == key else None
            self._shared_next = (key, mapped if mapped is not None else open_region(*key)[1], layout, mine)
        if mine != info.shm_layout:
            return [f"the learner's shared parameter layout {info.shm_layout} is not this worker's ({mine}): "
                    "the samplers' models differ; set rollout.shm_shared_weights=false"]
        return []

    def _sharing(self, info: GlooUpdateInfo) -> bool:
        """True when the parameters already live in `info`'s region."""
        return (info.shm_path, info.shm_token, info.shm_bytes) == self._shared_key

    def _share(self, info: GlooUpdateInfo) -> None:
        """Every bucket of a shared-mode update was written: adopt the region
        as this worker's parameter memory (no-op when it already is)."""
        if self._sharing(info):
            return
        key, region, layout, lid = self._shared_next
        self._unshare()
        params = dict(self.model.named_parameters())
        adopted = []
        for (name, _, _), slot in zip(layout["params"], param_slots(region, layout), strict=True):
            p = params[name]
            if p.shape != slot.shape or p.dtype != slot.dtype:
                raise WeightSyncError(f"shared slot of {name} is {slot.dtype} {list(slot.shape)}, the parameter "
                                      f"{p.dtype} {list(p.shape)}", stage="transfer")
            adopted.append((p, slot))
        for p, slot in adopted:
            p.data = slot
        self._shared_params = [p for p, _ in adopted]
        self._shared_key, self._shared_id, self._shared_next = key, lid, None
        # The replay plan's views point at the old memory: record afresh if packed updates come back.
        self._copy_plan, self._layout_cache = None, None
        # Nor is the packing region used any more (the sender freed it; a later
        # packed update names a new one), and the parameters' old memory is
        # free: give both back to the OS (glibc keeps freed heap memory).
        self._region = self._region_key = None
        _release_freed_memory()
        logger.info("opd_shm weight receiver: %d parameters now live in the shared region %s",
                    len(adopted), key[0])

    def _unshare(self) -> None:
        """Give shared parameters private memory again (before a packed update)."""
        if self._shared_key is None:
            return
        with torch.no_grad():
            for p in self._shared_params:
                p.data = p.data.clone()
        self._shared_params, self._shared_key, self._shared_id = [], None, None
        self._copy_plan, self._layout_cache = None, None

    def shared_region(self) -> str | None:
        """The shared region's path while the parameters live in it."""
        return None if self._shared_key is None else self._shared_key[0]

    def _map(self, path: str, token: str, nbytes: int) -> None:
        key = (path, token, nbytes)
        if key == self._region_key:
            return
        # Drop the old region: its mmap is unmapped once no view of it is left
        # (model loaders may still hold some until their layer completes).
        self._region = self._region_key = None
        _, self._region = open_region(path, token, nbytes)
        self._region_key = key
        logger.info("opd_shm weight receiver mapped %s (%.1f MiB)", path, nbytes / 2**20)

    def bucket_bytes(self, info: GlooUpdateInfo, b: int, nbytes: int) -> torch.Tensor:
        if info.shm_path is None:
            return super().bucket_bytes(info, b, nbytes)
        off = info.bucket_offsets[b]
        return self._region[off: off + nbytes]

    def shutdown(self) -> None:
        super().shutdown()
        self._region = self._region_key = None
        self._shared_next = None


def _release_freed_memory() -> None:
    """glibc's malloc_trim(0): return freed heap memory to the OS (without
    it, parameters moved into a shared region stay resident as free heap)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by later allocations instead
        pass


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called by the
    sampler actor through `llm.collective_rpc("opd_...")`."""

    def opd_weight_state(self) -> dict:
        """{"dirty": weights mixed by a failed update (opd engines: since the
        last finished update; vLLM's own engines, e.g. NCCL: by the last
        aborted one, see opd_abort_weight_update), "last_error": str|None,
        "load": how updates are loaded, "in_place" or "layerwise_reload",
        "reload_open": vLLM's layerwise reload is in progress (an update is
        being received, or a failed one was not rolled back yet),
        "engine": the weight-transfer engine's class name,
        "replayed_names": checkpoint names whose in-place load is replayed as
        plain copies (rollout.copy_plan), "replay_refused": why replay is
        off for this model (None while it is on), "shared_region": the
        shared-memory region the parameters live in (shm shared mode; None:
        their own memory)}."""
        engine = getattr(self, "weight_transfer_engine", None)
        ours = isinstance(engine, GlooWeightTransferEngine)
        plan = getattr(engine, "_copy_plan", None)
        shared = getattr(engine, "shared_region", None)
        model = engine.model if engine is not None else self.model_runner.model
        return {"dirty": bool(engine.dirty if ours else getattr(self, "_opd_dirty", False)),
                "last_error": engine.last_error if ours else getattr(self, "_opd_last_error", None),
                "load": "in_place" if plain_gemm_loaded(self.model_runner.model) else "layerwise_reload",
                "reload_open": layerwise_reload_state(model)[0],
                "engine": type(engine).__name__ if engine is not None else None,
                "replayed_names": plan.size() if plan is not None else 0,
                "replay_refused": plan.refused if plan is not None else None,
                "shared_region": shared() if shared is not None else None}

    def opd_shared_layout(self, names: list[str]) -> dict:
        """{"layout", "id", "why"}: how the update `names` can be written
        straight into this worker's parameters (shm shared mode), or why not."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not hasattr(engine, "shared_layout"):
            return {"layout": None, "id": None, "why": "the sampler's weight-transfer engine is not opd_shm"}
        layout, why = engine.shared_layout(list(names))
        return {"layout": layout, "id": None if layout is None else layout_id(layout), "why": why}

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

        opd engines undo their own layerwise state when a receive fails;
        here they only close a session whose sender died after the receive.
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


PLAIN_GEMM_LOAD_FORMAT = "opd_cpu_plain_gemm"
LOAD_THREADS_ENV = "OPD_WEIGHT_LOAD_THREADS"


def plain_gemm_loaded(model) -> bool:
    """True when `model` was loaded by PlainGemmModelLoader: every GEMM layer
    multiplies with F.linear on its live, plain weight."""
    return bool(getattr(model, "_opd_plain_gemm", False))


@register_model_loader(PLAIN_GEMM_LOAD_FORMAT)
class PlainGemmModelLoader(DefaultModelLoader):
    """vLLM's default (safetensors / bin) loader for CPU samplers with
    `rollout.cpu_gemm=plain`: before vLLM processes the loaded weights it
    marks every layer `_cpu_skip_gemm_dispatch` (vLLM's own switch: such a
    linear layer keeps its weight and uses F.linear instead of a re-packed
    oneDNN handler); embedding-method layers (lm_head), which vLLM dispatches
    while keeping their weight, are switched to F.linear after processing.
    The weights then stay where a weight update can copy into them."""

    def __init__(self, load_config) -> None:
        import copy

        if load_config.load_format != PLAIN_GEMM_LOAD_FORMAT:
            raise ValueError(f"PlainGemmModelLoader serves load_format={PLAIN_GEMM_LOAD_FORMAT!r}")
        inner = copy.copy(load_config)
        inner.load_format = "auto"  # which files to read: the default loader's choice
        super().__init__(inner)

    def load_weights(self, model, model_config) -> None:
        if model_config.quantization is not None:
            raise ValueError(f"rollout.cpu_gemm=plain supports unquantized models only; this one is quantized "
                             f"with {model_config.quantization!r}: use rollout.cpu_gemm=onednn")
        super().load_weights(model, model_config)
        for module in model.modules():
            if hasattr(module, "quant_method"):
                module._cpu_skip_gemm_dispatch = True

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        from vllm.platforms import current_platform

        model = super().load_model(vllm_config, model_config, prefix=prefix)
        if not current_platform.is_cpu():
            return model  # GPU kernels read the live weight already
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        # Only dense layers whose processed weight IS the checkpoint weight can be
        # updated in place (e.g. MoE experts are re-laid-out for the CPU kernels).
        other = sorted({type(m.quant_method).__name__ for m in model.modules()
                        if getattr(m, "quant_method", None) is not None
                        and not isinstance(m.quant_method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod))})
        if other:
            raise ValueError(f"rollout.cpu_gemm=plain supports dense unquantized models only; this model has layers "
                             f"with {other}: use rollout.cpu_gemm=onednn")
        problems = []
        for name, module in model.named_modules():
            if not hasattr(module, "cpu_linear"):
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.numel() == 0:
                problems.append(name)
            module.cpu_linear = torch.nn.functional.linear
        if problems:
            raise RuntimeError(f"rollout.cpu_gemm=plain: vLLM dropped the plain weight of {problems[:5]} "
                               f"({len(problems)} layers) despite _cpu_skip_gemm_dispatch; this vLLM version "
                               "does not support it: use rollout.cpu_gemm=onednn")
        model._opd_plain_gemm = True
        return model


for _name, _cls in ((GLOO_BACKEND_NAME, GlooWeightTransferEngine), (SHM_BACKEND_NAME, ShmWeightTransferEngine)):
    if _name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(_name, _cls)
