"""Settings of the host a role runs on, shared by every stage and the driver.
Imports nothing heavy (no torch, vllm or ray): the teacher's actor and the
driver import it before any engine starts.

    port = free_port()                                       # a TCPStore, an HTTP server
    env["VLLM_CPU_KVCACHE_SPACE"] = cpu_kv_cache_space(cfg.cpu.sampler_kv_cache_gib)
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" = on every interface, for a port
    other nodes connect to). Another process may take it before the caller
    binds it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_kv_cache_space(gib: float) -> str:
    """VLLM_CPU_KVCACHE_SPACE for a CPU engine's KV cache of `gib` GiB
    (cpu.sampler_kv_cache_gib of a sampler, cpu.teacher_kv_cache_gib of a
    teacher server the driver starts). vLLM reads a whole number of GiB
    (vllm/envs.py: int(...)), so the nearest one, at least 1."""
    return str(max(1, round(gib)))
