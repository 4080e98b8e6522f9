"""Replaying a model's weight loading as plain copies.

A CPU sampler with `rollout.cpu_gemm=plain` loads each weight update with the
model's own `load_weights`: vLLM's loaders map every checkpoint name to its
parameter (fusing q/k/v and gate/up into one tensor, padding the vocabulary)
and copy it there. For a 25M-parameter model that Python walk costs about as
much as the copies themselves (~10 ms for 99 tensors).

`CopyPlan` watches the first load of each name with a `TorchFunctionMode` and
keeps what it did when that was only copies of the incoming tensors, whole,
into views of the model's own tensors (plus fills of regions no copy
touches, e.g. vocabulary padding). Later updates of those names replay the
copies directly: the same bytes land in the same places, without the
loaders. Anything else the loader does (another in-place op, a computed or
sliced source, a destination that is not model memory, two copies or a fill
and a copy into the same memory, where order would matter)
makes the plan refuse the whole load, and every update keeps going through
`load_weights`. No vLLM import: the logic is tested on plain torch modules.

`param_layout(plan, named_params)` turns a complete plan into a layout the
learner can write to directly (rollout.weight_sync.plan_param_region): each
parameter that receives copies gets a slot of a shared-memory region, and
each checkpoint name the (offset, shape, strides) of its copies inside those
slots. Samplers whose layouts are equal keep their weights in one such
region, which the learner updates with one copy per byte (the shm
transport's "shared" mode, rollout/weight_receiver.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.overrides import TorchFunctionMode


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that a strided view may touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
    return (t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size())


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class _Recorder(TorchFunctionMode):
    """Records copy_(dst, src) with src one of the incoming tensors (whole);
    flags anything else that writes."""

    def __init__(self, incoming: dict[int, tuple[str, torch.Tensor]]):
        super().__init__()
        self.incoming = incoming
        self.copies: list[tuple[str, torch.Tensor]] = []  # (name, destination view), in order
        self.fills: list[torch.Tensor] = []
        self.refused: str | None = None

    def _refuse(self, why: str) -> None:
        if self.refused is None:
            self.refused = why

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "copy_":
            dst, src = args[0], args[1]
            hit = self.incoming.get(src.data_ptr()) if isinstance(src, torch.Tensor) else None
            if (hit is None or src.shape != hit[1].shape or src.stride() != hit[1].stride()
                    or src.dtype != hit[1].dtype):
                self._refuse(f"copy_ from a tensor that is not an incoming weight as sent ({tuple(src.shape)})")
            else:
                self.copies.append((hit[0], dst))
        elif name == "fill_":
            self.fills.append(args[0])
        elif name == "__setitem__" or name == "__set__" or (name.endswith("_") and not name.endswith("__")):
            self._refuse(f"the loader calls {name}")
        return func(*args, **kwargs)


class CopyPlan:
    """Per checkpoint name, the views of model memory its loader copies it
    into. `load(load_fn, weights)` replays known names and records the rest."""

    def __init__(self, targets: Iterable[torch.Tensor]):
        # The model's memory (parameters and buffers): recorded destinations must lie in it.
        self._targets = [_span(t) for t in targets if t.numel() > 0]
        self._copies: dict[str, list[torch.Tensor]] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.refused: str | None = None  # why replay is off for good (None: it is on)

    def size(self) -> int:
        """Names whose load is replayed."""
        return len(self._shapes)

    def knows(self, name: str, t: torch.Tensor) -> bool:
        return self._shapes.get(name) == (tuple(t.shape), t.dtype)

    def load(self, load_fn: Callable[[list], object], weights: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load `weights`: replay the copies of known names, send the others
        through `load_fn` (recording them while the plan is on). Returns the
        number of tensors replayed."""
        if self.refused is not None:
            load_fn(list(weights))
            return 0
        known = [(n, t) for n, t in weights if self.knows(n, t)]
        new = [(n, t) for n, t in weights if not self.knows(n, t)]
        for name, t in known:
            for dst in self._copies[name]:
                dst.copy_(t)
        if new:
            self._record(load_fn, new)
        return len(known)

    def copies(self) -> dict[str, tuple[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]]]:
        """name -> ((shape, dtype) it arrives as, the views of model memory it
        is copied into), for every replayed name."""
        return {n: (self._shapes[n], self._copies[n]) for n in self._shapes}

    def _record(self, load_fn: Callable[[list], object], weights: list[tuple[str, torch.Tensor]]) -> None:
        incoming = {t.data_ptr(): (n, t) for n, t in weights if t.numel() > 0}
        if len(incoming) != sum(1 for _, t in weights if t.numel() > 0):
            self.refused = "two incoming tensors share memory"
        rec = _Recorder(incoming)
        with rec:
            load_fn(list(weights))
        if self.refused is not None:
            return
        why = rec.refused
        copy_spans = [_span(d) for _, d in rec.copies]
        for span in copy_spans:
            if not any(t[0] <= span[0] and span[1] <= t[1] for t in self._targets):
                why = why or "a copy lands outside the model's parameters and buffers"
        # Names recorded again (a new shape) replace their old entries.
        again = {n for n, _ in weights}
        known = [_span(d) for n, ds in self._copies.items() if n not in again for d in ds]
        ordered = sorted(known + copy_spans)
        if any(_overlap(a, b) for a, b in zip(ordered, ordered[1:])):
            why = why or "two copies write the same memory (their order would matter)"
        for fill in rec.fills:
            f = _span(fill)
            if any(_overlap(f, c) for c in copy_spans):
                why = why or "a fill overlaps a copied region (order would matter)"
        if why is not None:
            self.refused, self._copies, self._shapes = why, {}, {}
            return
        for name, t in weights:
            self._copies[name] = [d for n, d in rec.copies if n == name]
            self._shapes[name] = (tuple(t.shape), t.dtype)


def param_layout(plan: CopyPlan, named_params: Iterable[tuple[str, torch.Tensor]],
                 names: Sequence[str]) -> tuple[dict | None, str | None]:
    """(layout, None), or (None, why not), for writing the checkpoint tensors
    `names` straight into the memory of the parameters their replayed copies
    land in. The layout (JSON-able, equal for equal models):

        {"params": [[name, dtype, shape], ...],       # the parameters that receive copies
         "fill": [value or None, ...],                # per parameter: the value of every element
                                                      #   no copy writes (e.g. vocabulary padding)
         "dests": {ckpt_name: [dtype, shape, [[param index, element offset, shape, strides], ...]]}}

    Refused when replay is off, a name is not replayed, a copy lands outside
    the parameters (a buffer) or in another dtype than its parameter's, a
    parameter is not contiguous, or what no copy writes is not one finite
    value (a shared copy could not hold it)."""
    if plan.refused is not None:
        return None, f"copy replay is off ({plan.refused})"
    copies = plan.copies()
    missing = [n for n in names if n not in copies]
    if missing:
        return None, f"{len(missing)} names are not replayed yet (first: {missing[0]!r})"
    params = [(n, p) for n, p in named_params if p.numel() > 0]
    spans = [_span(p) for _, p in params]
    index: dict[int, int] = {}
    written_by: dict[int, list[tuple[int, torch.Tensor]]] = {}  # param -> (element offset, view)
    dests: dict[str, list] = {}
    for name in names:
        (shape, dtype), views = copies[name]
        out = []
        for v in views:
            span = _span(v)
            hit = [i for i, s in enumerate(spans) if s[0] <= span[0] and span[1] <= s[1]]
            if not hit:
                return None, f"a copy of {name!r} lands outside the model's parameters"
            i = hit[0]
            p = params[i][1]
            if v.dtype != p.dtype:
                return None, f"a copy of {name!r} writes {v.dtype} into a {p.dtype} parameter"
            if not p.is_contiguous():
                return None, f"parameter {params[i][0]!r} is not contiguous"
            off = (v.data_ptr() - p.data_ptr()) // p.element_size()
            out.append([index.setdefault(i, len(index)), off, list(v.shape), list(v.stride())])
            written_by.setdefault(i, []).append((off, v))
        dests[name] = [str(dtype).removeprefix("torch."), list(shape), out]
    used = sorted(index, key=index.get)
    fills = []
    for i in used:
        p = params[i][1]
        written = torch.zeros(p.numel(), dtype=torch.bool)
        for off, v in written_by[i]:
            written.as_strided(v.shape, v.stride(), off).fill_(True)
        rest = p.detach().reshape(-1)[~written]
        if rest.numel() == 0:
            fills.append(None)
            continue
        value = rest[0].item()
        if not torch.isfinite(rest[:1]).all() or not bool((rest == rest[0]).all()):
            return None, f"parameter {params[i][0]!r} holds {rest.numel()} elements no copy writes, not all one value"
        fills.append(value)
    layout = {"params": [[params[i][0], str(params[i][1].dtype).removeprefix("torch."), list(params[i][1].shape)]
                         for i in used],
              "fill": fills, "dests": dests}
    return layout, None
