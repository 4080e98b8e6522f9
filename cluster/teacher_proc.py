"""The run's teacher_server: a running one (`teacher.url`), or one the driver
starts for `teacher.model` when `teacher.url` is null.

The driver calls `start_teacher(cfg.teacher, model_path, run_dir, ...)` once,
after Ray is connected and the samplers' and learners' placement groups are
reserved; it returns a handle whose `.url` (and `.api_key_file`) the teacher
client uses and whose `.stop()` ends the server.

A driver-started server is `python -m teacher_server`, run as a process
inside a Ray actor (`TeacherServerActor`) whose resources Ray books: with
GPUs in the run, `teacher.tensor_parallel_size` GPUs (Ray sets the actor's
CUDA_VISIBLE_DEVICES and the server inherits it, so the teacher never runs
on GPUs that Ray hands to samplers or learners; cluster/placement.py counts
them when it checks the cluster's GPUs), and `teacher.cpus` CPUs. One code
path on CPU and GPU.

Where it listens: the actor may land on any node. On the driver's node the
server binds 127.0.0.1 (only the driver talks to it); on another node it
binds that node's IP (the one Ray uses for it), so it is reachable over the
cluster's network, and the URL names that IP. Either way the server takes
requests only with an API key: `teacher.api_key_file`, or, when that is
null, a random key made for the run (the client reads it from a private
temp file on the driver's node, removed when the teacher stops). The key
reaches the server through its stdin (`--api-key-file /dev/stdin`): it is
never written to a file on the teacher's node and is not among the actor's
creation arguments (which Ray keeps). The server speaks plain HTTP: on an
untrusted network use `teacher.url` behind a TLS proxy instead.

Its log goes to `<run.dir>/teacher_server.log`, written on the teacher's node
(the same file when `run.dir` is on a filesystem every node sees, as a
multi-node run needs anyway). A server that exits during start-up fails the
run with the last lines of that log (read through the actor, wherever it
runs); one that is not healthy within `teacher.startup_timeout_s`, or whose
actor Ray cannot place in that time, fails it too.

`handle.stop()` sends SIGTERM (teacher_server finishes the requests it
admitted and exits 0), kills the server's process group if it does not exit
in time, then ends the actor. If the actor dies first (e.g. the driver is
killed and Ray ends its actors), Ray's raylet kills the actor's child
processes (its kill_child_processes_on_worker_exit behaviour, on by default
in Ray 2.60), the server with them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.config import TeacherConfig
from rollout.config import url_list
from rollout.host import KV_MAX_SEQS, free_port, kv_cache_size

LOG_NAME = "teacher_server.log"


class TeacherStartError(RuntimeError):
    pass


def bind_host(actor_node_id: str, driver_node_id: str, node_ip: str) -> str:
    """Where a driver-started server listens: loopback when it shares the
    driver's node (only the driver talks to it), else the node's cluster IP."""
    return "127.0.0.1" if actor_node_id == driver_node_id else node_ip


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None, *, exited=None) -> None:
    """Poll `url`/health until it answers 200. Raise TeacherStartError when
    the server exits first (`proc` ended, or `exited()` returns its
    (exit code, log tail)), or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise TeacherStartError(f"teacher_server exited with code {proc.returncode} before it was healthy; "
                                    f"last lines of {log_path}:\n{tail}")
        gone = exited() if exited is not None else None
        if gone is not None:
            code, tail = gone
            raise TeacherStartError(f"teacher_server exited with code {code} before it was healthy; "
                                    f"last lines of {log_path}:\n{tail}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(1.0)
    raise TeacherStartError(f"teacher_server at {url} not healthy after {timeout_s:.0f}s (last: {last}); "
                            f"raise teacher.startup_timeout_s or check {log_path}")


class TeacherServerActor:
    """Runs one `python -m teacher_server` process (a Ray actor: the resources
    it is created with are the server's). Every call is short: the driver
    polls, so `stop` is never queued behind a long wait."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self, server_args: list[str], api_key: str, log_path: str, env: dict[str, str],
              unset_env: list[str], driver_node_id: str, model_ref=None, threads=None) -> str:
        """Launch the server; returns its URL. `env` is set and `unset_env`
        removed in its environment on top of this actor's (e.g. Ray's
        OMP_NUM_THREADS, which the driver's own process did not have).
        `model_ref` (cluster.models.ResolvedModel): made present on this node
        first, as the student is on the samplers' and learners' nodes.
        `threads`: the server's OMP_NUM_THREADS on CPU, a count or the
        placement plan's ThreadShare, resolved here on the server's node
        (None: the server's own default)."""
        import ray

        if model_ref is not None:
            from cluster.models import ensure_local

            problem = ensure_local(model_ref)
            if problem:
                raise TeacherStartError(problem)
        ctx = ray.get_runtime_context()
        host = bind_host(ctx.get_node_id(), driver_node_id, ray.util.get_node_ip_address())
        port = free_port(host)
        cmd = [sys.executable, "-m", "teacher_server", *server_args, "--host", host, "--port", str(port),
               "--api-key-file", "/dev/stdin"]
        proc_env = {k: v for k, v in os.environ.items() if k not in unset_env}
        proc_env.update(env)
        if threads is not None:
            proc_env["OMP_NUM_THREADS"] = str(threads if isinstance(threads, int) else threads.threads())
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: stop() can kill the whole group (vLLM's engine core too) if SIGTERM hangs.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         env=proc_env, start_new_session=True)
        try:
            self.proc.stdin.write(api_key.encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited already: exit_status() reports it with its log
        return f"http://{host}:{port}"

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def resources(self) -> dict:
        """What Ray booked for this actor (the server's CPUs and GPUs) and the
        GPUs it made visible to it (the server inherits them)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"assigned": ctx.get_assigned_resources(), "gpu_ids": ray.get_gpu_ids(), "node_id": ctx.get_node_id()}

    def exit_status(self, tail_chars: int = 3000) -> tuple[int, str] | None:
        """(exit code, the log's last `tail_chars`) once the server has exited; None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return self.proc.returncode, self.log_tail(tail_chars)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return ""

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL the process group;
        returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        return self.proc.returncode


class TeacherHandle:
    """A running teacher: `url` (a tuple: replicas), `api_key_file` (None: no key), `stop()`."""

    def __init__(self, url: str | tuple[str, ...], actor=None, log_path: Path | None = None,
                 api_key_file: str | None = None, own_key_file: bool = False):
        self.url = url
        self.actor = actor
        self.log_path = log_path
        self.api_key_file = api_key_file
        self._own_key_file = own_key_file

    @property
    def self_started(self) -> bool:
        return self.actor is not None

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.actor is not None:
            import ray

            actor, self.actor = self.actor, None
            if self.url:  # the server was launched (an actor never placed has nothing to stop)
                try:
                    ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + 60)
                except Exception:  # noqa: BLE001 - dead already, or hung: ray.kill ends it (Ray kills its children)
                    pass
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        if self._own_key_file and self.api_key_file:
            try:
                os.unlink(self.api_key_file)
            except FileNotFoundError:
                pass
            self._own_key_file = False


def server_args(tcfg: TeacherConfig, model_path: str) -> list[str]:
    """teacher_server's arguments for `tcfg` (without host, port and key)."""
    args = ["--model", model_path, "--dtype", tcfg.dtype, "--max-model-len", str(tcfg.max_model_len),
            "--tensor-parallel-size", str(tcfg.tensor_parallel_size)]
    engine_args = dict(tcfg.engine_args)
    # The engine arguments the server takes as its own flags.
    for name, flag in (("max_num_seqs", "--max-num-seqs"), ("max_num_batched_tokens", "--max-batch-tokens")):
        if name in engine_args:
            args += [flag, str(engine_args.pop(name))]
    if engine_args:
        args += ["--engine-args", json.dumps(engine_args)]
    return args


def _run_key(tcfg: TeacherConfig) -> tuple[str, str, bool]:
    """(key, file the client reads it from, whether that file is ours to delete)."""
    if tcfg.api_key_file:
        try:
            key = Path(tcfg.api_key_file).read_text().strip()
        except OSError as e:
            raise TeacherStartError(f"teacher.api_key_file: cannot read {tcfg.api_key_file} ({e.strerror}); give "
                                    "a file holding the key the teacher server should require") from e
        if not key:
            raise TeacherStartError(f"teacher.api_key_file: {tcfg.api_key_file} is empty; put the key on its "
                                    "first line")
        return key, tcfg.api_key_file, False
    key = secrets.token_urlsafe(32)
    fd, path = tempfile.mkstemp(prefix="opd-teacher-key-")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path, True


def start_teacher(tcfg: TeacherConfig, model_path: str | None, run_dir: Path, *, num_gpus: float = 0.0,
                  env: dict | None = None, model_ref=None, kv_cache_gib: float | str = "auto",
                  kv_seqs: int = KV_MAX_SEQS, threads=None) -> TeacherHandle:
    """Wait for `teacher.url`, or start teacher_server for `model_path` in a
    Ray actor booking `num_gpus` GPUs (the caller passes
    teacher.tensor_parallel_size when the run has GPUs, else 0) and
    `teacher.cpus` CPUs; Ray must be connected. `env`: extra environment of
    the server; `model_ref`: the ResolvedModel of `model_path`, fetched on
    the teacher's node when that node lacks it; `kv_cache_gib`: the KV cache
    of a CPU server (`cpu.teacher_kv_cache_gib`; "auto": `kv_seqs` sequences
    of teacher.max_model_len tokens: rollout.host.kv_cache_size); `threads`:
    its threads on CPU (a count, or the placement plan's ThreadShare,
    resolved on the teacher's node; None: the server's default). See the
    module docstring."""
    if tcfg.url:
        deadline = time.monotonic() + tcfg.startup_timeout_s
        for url in url_list(tcfg.url):  # every replica must be up; an error names the one that is not
            wait_healthy(url, timeout_s=max(1.0, deadline - time.monotonic()))
        return TeacherHandle(tcfg.url, api_key_file=tcfg.api_key_file)
    assert model_path is not None
    import ray

    t0 = time.monotonic()
    key, key_file, own = _run_key(tcfg)
    log_path = Path(run_dir) / LOG_NAME
    actor = ray.remote(TeacherServerActor).options(num_cpus=tcfg.cpus, num_gpus=num_gpus).remote()
    handle = TeacherHandle("", actor, log_path, key_file, own)
    try:
        args = server_args(tcfg, model_path)
        if num_gpus == 0:
            dtype = "float32" if tcfg.dtype == "auto" else tcfg.dtype  # rollout.weight_sync.concrete_dtype on CPU
            kv = kv_cache_size(kv_cache_gib, model_path, dtype, seqs=kv_seqs, seq_tokens=tcfg.max_model_len,
                               max_model_len=tcfg.max_model_len, key="cpu.teacher_kv_cache_gib")
            print(f"[opd] teacher KV cache: {kv.bytes / 2**20:.0f} MiB ({kv.reason})", flush=True)
            args += ["--kv-cache-memory-bytes", str(kv.bytes)]
        unset = [] if "OMP_NUM_THREADS" in os.environ else ["OMP_NUM_THREADS"]
        ref = actor.start.remote(args, key, str(log_path), dict(env or {}), unset,
                                 ray.get_runtime_context().get_node_id(), model_ref, threads)
        try:
            handle.url = ray.get(ref, timeout=tcfg.startup_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TeacherStartError(
                f"the teacher's Ray actor ({tcfg.cpus:g} CPU, {num_gpus:g} GPU) was not placed within "
                f"teacher.startup_timeout_s={tcfg.startup_timeout_s:g}s; free resources: "
                f"{ray.available_resources()}. Free some, lower teacher.tensor_parallel_size / teacher.cpus, "
                "or serve the teacher elsewhere and set teacher.url") from e
        except ray.exceptions.RayError as e:
            raise TeacherStartError(f"could not launch teacher_server in its Ray actor: {e}") from e
        left = max(1.0, tcfg.startup_timeout_s - (time.monotonic() - t0))
        wait_healthy(handle.url, left, log_path=log_path,
                     exited=lambda: ray.get(actor.exit_status.remote(), timeout=60))
    except BaseException:
        handle.stop(timeout_s=10)
        raise
    return handle
