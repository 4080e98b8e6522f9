"""LoRA students (`learner.lora.rank` > 0): which layers get adapters, the
start-up check, and the two views of an adapted student that leave the
learner.

* `match_target_modules` / `default_target_modules`: the layer names that
  `learner.lora.target_modules` selects (pure, unit-tested).
* `check_student`: run by the driver before any actor starts: peft wraps the
  student, built on the meta device from its config (no weights), with the
  run's LoRA settings; every problem comes back as a config problem (exit 2).
* `wrap`: a learner rank puts the adapters on its student (peft) before
  DeepSpeed sees it; only the adapter parameters require grad, so only they
  go to the optimizer.
* `export_items`: the student as a plain checkpoint, base parameter names and
  shapes, each adapted weight merged (W + scaling * B @ A), for the HF export
  and, where a sampler cannot serve adapters, for the merged weight push.
* `adapter_state` / `adapter_files` (rollout/weight_sync.py `write_adapter` writes them): the adapter alone in
  peft's format (`adapter_config.json`, `adapter_model.safetensors`), what
  vLLM's LoRA loader and `peft.PeftModel.from_pretrained` read.

Tests: tests/unit/test_lora.py (pure logic, peft on tiny models),
tests/e2e/test_cluster.py::test_lora_student (the real driver).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from learner.config import LoraConfig

# The one adapter a learner trains (peft's default adapter name).
ADAPTER = "default"
# peft's prefix in front of the wrapped model's parameter names.
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def match_target_modules(module_names: Iterable[str], targets: Iterable[str]) -> tuple[list[str], list[str]]:
    """peft's rule for a list of names: a target matches a module whose name
    is the target or ends with "." + target. Returns (the matched module
    names in order, the targets that matched none)."""
    targets = list(targets)
    names = list(module_names)
    hit = {t: False for t in targets}
    matched = []
    for n in names:
        ok = False
        for t in targets:
            if n == t or n.endswith("." + t):
                hit[t] = ok = True
        if ok:
            matched.append(n)
    return matched, [t for t in targets if not hit[t]]


def default_target_modules(linear_names: Iterable[str], output_name: str | None) -> list[str]:
    """`learner.lora.target_modules` left empty: every linear layer of the
    attention and MLP blocks, i.e. every linear layer but the output head
    (peft's "all-linear"), as the distinct last name components
    (q_proj, k_proj, ..., down_proj), in first-seen order."""
    out: list[str] = []
    for n in linear_names:
        if n == output_name:
            continue
        leaf = n.rsplit(".", 1)[-1]
        if leaf not in out:
            out.append(leaf)
    return out


def linear_module_names(model) -> tuple[list[str], str | None]:
    """(names of the model's linear layers, name of its output head or None)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover - transformers always has it
        kinds = (torch.nn.Linear,)
    out_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, head = [], None
    for n, m in model.named_modules():
        if isinstance(m, kinds):
            names.append(n)
            if m is out_mod:
                head = n
    return names, head


def resolve_targets(model, cfg: LoraConfig) -> list[str]:
    """The target module names of `cfg` on `model` (the HF model before
    wrapping): the user's, or the default. Raises ValueError naming the key."""
    if cfg.target_modules:
        names = [n for n, _ in model.named_modules()]
        _, missing = match_target_modules(names, cfg.target_modules)
        if missing:
            raise ValueError(
                f"learner.lora.target_modules: {list(missing)} match no module of the student "
                f"({type(model).__name__}); its linear layers are "
                f"{default_target_modules(*linear_module_names(model)) or 'none'}: name some of those, or leave "
                "the key empty for all of them")
        return list(cfg.target_modules)
    targets = default_target_modules(*linear_module_names(model))
    if not targets:
        raise ValueError(f"learner.lora.rank={cfg.rank}: the student ({type(model).__name__}) has no linear layer "
                         "besides its output head for an adapter; train it fully (learner.lora.rank=0)")
    return targets


def peft_config(cfg: LoraConfig, targets: list[str], base_model_path: str | None = None):
    """peft's LoraConfig for a causal LM: plain LoRA (no bias, no DoRA, the
    standard init with B = 0, so the adapted student starts as the base)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets),
                          bias="none", task_type="CAUSAL_LM", init_lora_weights=True,
                          base_model_name_or_path=base_model_path)


def wrap(model, cfg: LoraConfig, base_model_path: str | None = None):
    """`model` with LoRA adapters on `cfg`'s target modules (peft): the base
    parameters frozen, the adapters trainable. Returns the peft model."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, resolve_targets(model, cfg), base_model_path))


def check_student(model_path: str, cfg: LoraConfig) -> list[str]:
    """Config problems of training the student at `model_path` with `cfg`
    (empty when rank is 0 or all is well). peft wraps the student built on
    the meta device (its config only, no weights, no memory): an architecture
    peft cannot wrap, target modules that match nothing or that are not
    layers LoRA supports, all surface here, before any actor starts."""
    if cfg.rank == 0:
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_cfg = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as e:  # noqa: BLE001 - reported as the config problem it is
        return [f"learner.lora.rank={cfg.rank}: cannot build the student {model_path} to place adapters: "
                f"{type(e).__name__}: {str(e)[:300]}"]
    try:
        wrap(model, cfg)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("learner.lora"):
            return [msg]
        return [f"learner.lora: peft cannot put LoRA adapters on the student ({type(model).__name__}, "
                f"learner.lora.target_modules={list(cfg.target_modules) or 'every linear layer'}): "
                f"{msg[:400]}; choose linear layers as target modules, or train fully (learner.lora.rank=0)"]
    return []


# ----------------------------------------------------------------- export

@dataclasses.dataclass
class ExportItem:
    """One tensor of the plain (merged) checkpoint: its HF name, the live
    parameters it is made of (gather them all under ZeRO-3), and how to make
    it from them once they are gathered."""

    name: str
    params: list
    make: Callable[[], "object"]


def export_items(peft_model, strip: Callable[[str], str]) -> list[ExportItem]:
    """The adapted student as its base checkpoint: one item per base
    parameter, in `named_parameters` order, under the base model's names
    (`strip` removes wrapper prefixes, e.g. DeepSpeed's); an adapted layer's
    weight is merged, W + its adapter's delta (peft's `get_delta_weight`:
    scaling * B @ A, peft/tuners/lora/layer.py `Linear.get_delta_weight`);
    the adapter parameters themselves are not items."""
    from peft.tuners.lora import LoraLayer

    modules = {strip(n): m for n, m in peft_model.named_modules()}
    items: list[ExportItem] = []
    for raw, p in peft_model.named_parameters():
        name = strip(raw)
        if is_adapter_name(name):
            continue
        hf = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        layer = modules.get(name.split(".base_layer.")[0]) if ".base_layer." in name else None
        if not isinstance(layer, LoraLayer) or not name.endswith(".base_layer.weight"):
            # Not adapted, or a bias (bias="none": the adapter leaves it alone).
            items.append(ExportItem(hf, [p], lambda p=p: p.detach()))
            continue

        def merged(p=p, layer=layer):
            import torch

            with torch.no_grad():
                delta = layer.get_delta_weight(ADAPTER)
                return (p.detach().float() + delta.float()).to(p.dtype)

        items.append(ExportItem(hf, [p, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight], merged))
    return items


def is_adapter_name(name: str) -> bool:
    """Whether a (peft) parameter name is an adapter weight."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_params(peft_model, strip: Callable[[str], str]) -> list[tuple[str, object]]:
    """(peft checkpoint key, live parameter) of every adapter weight: the key
    as peft's save_pretrained writes it (the adapter name dropped:
    "base_model.model.<module>.lora_A.weight")."""
    out = []
    for raw, p in peft_model.named_parameters():
        name = strip(raw)
        if is_adapter_name(name):
            out.append((name.replace(f".{ADAPTER}.", "."), p))
    return out


def adapter_files(state: dict, peft_cfg) -> dict[str, bytes]:
    """The adapter in peft's format, as {file name: bytes}: safetensors of
    `state` (peft keys -> CPU tensors) and peft's own adapter_config.json."""
    from safetensors.torch import save

    with tempfile.TemporaryDirectory(prefix="opd-lora-") as d:
        peft_cfg.save_pretrained(d)
        cfg_bytes = (Path(d) / ADAPTER_CONFIG).read_bytes()
    return {ADAPTER_CONFIG: cfg_bytes,
            ADAPTER_WEIGHTS: save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})}


def adapter_summary(files: dict[str, bytes]) -> str:
    """A one-line description of an adapter (rank, targets, size) for logs."""
    cfg = json.loads(files[ADAPTER_CONFIG])
    size = sum(len(b) for b in files.values())
    return f"rank {cfg.get('r')}, alpha {cfg.get('lora_alpha')}, targets {sorted(cfg.get('target_modules') or [])}, " \
           f"{size / 2**20:.2f} MiB"
