"""Start and stop a teacher_server process for the embedded default (when
`teacher.url` is null), or point at a running one.

The driver calls `start_teacher(cfg.teacher, run_dir)` once; it returns a
handle whose `.url` the teacher client uses and whose `.stop()` sends SIGTERM
(teacher_server finishes in-flight requests and exits 0). The server's log goes
to `<run.dir>/teacher_server.log`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.config import TeacherConfig


class TeacherStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise TeacherStartError(f"teacher_server exited with code {proc.returncode} before it was healthy; "
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


class TeacherHandle:
    def __init__(self, url: str, proc: subprocess.Popen | None, log_path: Path | None):
        self.url = url
        self.proc = proc
        self.log_path = log_path

    @property
    def self_started(self) -> bool:
        return self.proc is not None

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_teacher(tcfg: TeacherConfig, model_path: str | None, run_dir: Path, env: dict | None = None) -> TeacherHandle:
    """Connect to `teacher.url`, or launch `python -m teacher_server` for `model_path`."""
    if tcfg.url:
        wait_healthy(tcfg.url, timeout_s=tcfg.startup_timeout_s)
        return TeacherHandle(tcfg.url, None, None)
    assert model_path is not None
    port = free_port()
    log_path = run_dir / "teacher_server.log"
    cmd = [sys.executable, "-m", "teacher_server", "--model", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", tcfg.dtype, "--max-model-len", str(tcfg.max_model_len),
           "--tensor-parallel-size", str(tcfg.tensor_parallel_size)]
    if tcfg.api_key_file:
        cmd += ["--api-key-file", tcfg.api_key_file]
    proc_env = dict(os.environ)
    proc_env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(tcfg.kv_cache_gib))))
    proc_env.update(env or {})
    log_f = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
    log_f.close()
    url = f"http://127.0.0.1:{port}"
    handle = TeacherHandle(url, proc, log_path)
    try:
        wait_healthy(url, tcfg.startup_timeout_s, proc, log_path)
    except BaseException:
        handle.stop(timeout_s=10)
        raise
    return handle
