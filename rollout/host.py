"""Settings of the host a role runs on, shared by every stage and the driver.
Imports nothing heavy (no torch, vllm or ray): the teacher's actor and the
driver import it before any engine starts.

    port = free_port()                                       # a TCPStore, an HTTP server
    size = kv_cache_size("auto", model_dir, "float32", seqs=32, seq_tokens=96)
    LLM(..., kv_cache_memory_bytes=size.bytes)               # a CPU engine's KV cache
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
# vLLM's CPU engines keep the KV cache in blocks of at most this many tokens.
KV_BLOCK_TOKENS = 128
# Smallest KV cache "auto" gives a CPU engine, and what it gives when the
# model's config does not say how large one token's KV is.
KV_AUTO_FLOOR_BYTES = 64 * MiB
KV_FALLBACK_BYTES = 1 * GiB
# The most sequences a CPU engine runs at once (vLLM's default max_num_seqs
# for an offline engine on CPU, engine/arg_utils.py _get_batch_defaults; the
# teacher server passes --max-num-seqs 256).
KV_MAX_SEQS = 256
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" = on every interface, for a port
    other nodes connect to). Another process may take it before the caller
    binds it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """This node's IP (as Ray sees it) and a TCP port free on every interface
    (for a rendezvous other nodes' processes connect to). Light on purpose: a
    Ray task that only asks for it starts no torch."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        ip = "127.0.0.1"
    return ip, free_port("")


def kv_bytes_per_token(model_dir: str | Path, dtype: str) -> int | None:
    """Bytes one token's keys and values take in a vLLM engine of the model at
    `model_dir` (its config.json): 2 x layers x KV heads x head dim x the
    dtype's bytes. None when the config lacks one of them (or the dtype is
    not a float type vLLM keeps the cache in)."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    c = c.get("text_config") or c
    layers, heads = c.get("num_hidden_layers"), c.get("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)) or dtype not in _DTYPE_BYTES:
        return None
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[dtype]


@dataclasses.dataclass(frozen=True)
class KvCacheSize:
    """A CPU engine's KV cache (`kv_cache_memory_bytes` of vLLM) and how it was chosen (logged)."""

    bytes: int
    reason: str


def kv_cache_size(gib: float | str, model_dir: str | Path, dtype: str, seqs: int, seq_tokens: int,
                  max_model_len: int = 0, key: str = "cpu.sampler_kv_cache_gib") -> KvCacheSize:
    """The KV cache of a CPU engine of `model_dir`: `gib` GiB when a number;
    for "auto", what `seqs` sequences of up to `seq_tokens` tokens need at
    once (each rounded up to whole KV blocks, one spare sequence for vLLM's
    null block and block rounding, `seqs` capped at KV_MAX_SEQS), and at
    least one sequence of the engine's `max_model_len` (vLLM refuses to start
    below that) and KV_AUTO_FLOOR_BYTES. vLLM allocates and zeroes the whole
    cache when the engine starts, so this is resident memory from then on."""
    if gib != "auto":
        return KvCacheSize(int(float(gib) * GiB), f"{key}={gib}")
    per_token = kv_bytes_per_token(model_dir, dtype)
    if per_token is None:
        return KvCacheSize(KV_FALLBACK_BYTES, f"{key}=auto: {model_dir}/config.json does not give the KV size of "
                                              f"a token; {KV_FALLBACK_BYTES / GiB:g} GiB (set {key} to choose)")
    n = min(max(1, seqs), KV_MAX_SEQS) + 1
    tokens = math.ceil(max(1, seq_tokens) / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    longest = (math.ceil(max_model_len / KV_BLOCK_TOKENS) + 1) * KV_BLOCK_TOKENS
    need = n * tokens * per_token
    size = max(KV_AUTO_FLOOR_BYTES, need, longest * per_token)
    why = f"{key}=auto: {n} sequences x {tokens} tokens x {per_token / 1024:g} KiB per token = {need / MiB:.1f} MiB"
    if size > need:
        why += (f", raised to one {max_model_len}-token sequence (max_model_len)" if size > KV_AUTO_FLOOR_BYTES
                else f", raised to the floor of {KV_AUTO_FLOOR_BYTES // MiB} MiB")
    return KvCacheSize(size, why)
