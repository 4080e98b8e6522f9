"""Command line of the teacher log-prob service.

    python -m teacher_server --model PATH [--host 127.0.0.1] [--port 8000]
        [--api-key-file FILE] [--max-batch-tokens N] [--max-queue N]
        [--max-request-bytes N] [--tensor-parallel-size K] [--dtype auto|float32|bfloat16]
        [--max-model-len N] [--max-top-k K] [--served-model-name NAME]
        [--kv-cache-memory-bytes N] [--engine-args JSON]

(also installed as `opd-teacher-server`). Binds to 127.0.0.1 unless --host says
otherwise; set an API key (--api-key-file) before exposing it on a network.
SIGTERM drains admitted requests and exits 0. The protocol is documented in
teacher_server/protocol.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from teacher_server.protocol import DEFAULT_MAX_TOP_K


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def _engine_args(v: str) -> dict:
    try:
        args = json.loads(v)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): give an object such as "
                                         "'{\"enable_prefix_caching\": false}'") from None
    if not isinstance(args, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of engine arguments, got {type(args).__name__}")
    from teacher_server.engine import SERVER_ENGINE_ARGS, engine_args_problems

    if problems := engine_args_problems("--engine-args", args, SERVER_ENGINE_ARGS):
        raise argparse.ArgumentTypeError("; ".join(problems))
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="teacher_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (or a locally cached hub id)")
    p.add_argument("--served-model-name", default=None, help="name reported in answers (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it: set an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key; clients send 'Authorization: Bearer <key>'")
    p.add_argument("--max-batch-tokens", type=_positive, default=None,
                   help="vLLM max_num_batched_tokens: tokens per engine step (default: vLLM's)")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="requests admitted at once; more get 429 + Retry-After")
    p.add_argument("--max-request-bytes", type=_positive, default=64 * 1024 * 1024,
                   help="largest request body; larger get 413")
    p.add_argument("--tensor-parallel-size", type=_positive, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--max-model-len", type=_positive, default=None, help="default: the model's")
    p.add_argument("--max-top-k", type=int, default=DEFAULT_MAX_TOP_K, help="largest top_k a request may ask")
    p.add_argument("--max-num-seqs", type=_positive, default=256, help="vLLM max_num_seqs")
    p.add_argument("--kv-cache-memory-bytes", type=_positive, default=None,
                   help="vLLM's KV cache size in bytes (default: VLLM_CPU_KVCACHE_SPACE on CPU, "
                        "the free GPU memory on GPU); on CPU it is allocated in full at start")
    p.add_argument("--engine-args", type=_engine_args, default={}, metavar="JSON",
                   help="more vLLM engine arguments, a JSON object of EngineArgs fields (`vllm serve`'s flags with "
                        "'_' for '-'), e.g. '{\"enable_prefix_caching\": false, \"quantization\": \"fp8\"}'; "
                        "not the ones the flags above set")
    p.add_argument("--shutdown-timeout-s", type=float, default=120.0,
                   help="how long SIGTERM waits for admitted requests")
    return p.parse_args(argv)


def _read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SystemExit(f"teacher_server: cannot read --api-key-file {path}: {e.strerror}") from e
    if not key:
        raise SystemExit(f"teacher_server: --api-key-file {path} is empty; put the key on its first line")
    return key


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` and argument errors do not pay for vLLM's import.
    from teacher_server.engine import EngineOptions, TeacherEngine
    from teacher_server.server import ServerOptions, TeacherServer

    eopts = EngineOptions(model=args.model, served_model_name=args.served_model_name, dtype=args.dtype,
                          tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                          max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                          max_top_k=args.max_top_k, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          engine_args=args.engine_args)
    sopts = ServerOptions(host=args.host, port=args.port, api_key=_read_api_key(args.api_key_file),
                          max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                          shutdown_timeout_s=args.shutdown_timeout_s)

    async def run() -> int:
        server = TeacherServer(lambda: TeacherEngine.build(eopts), sopts)
        return await server.serve()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
