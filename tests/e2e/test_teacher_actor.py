"""The teacher the driver serves itself (`teacher.url` null), for real:
cluster/teacher_proc.py starts `python -m teacher_server` inside a Ray actor
that books the server's resources, on this (the driver's) node, so on
127.0.0.1, with an API key made for the run; its log goes to
<run.dir>/teacher_server.log; `stop()` ends it; a server that dies during
start-up fails the start at once with the tail of its log.

    .venv/bin/python -m pytest tests/e2e/test_teacher_actor.py -q
"""

import json
import os
import re
import stat
import time
import urllib.error
import urllib.request

import psutil
import pytest
import ray

from cluster.config import TeacherConfig
from cluster.teacher_proc import LOG_NAME, TeacherStartError, start_teacher


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_driver_started_teacher_runs_in_a_ray_actor_that_books_it(ray_session, teacher_path, tmp_path):
    # teacher.engine_args: max_num_seqs goes to the server's --max-num-seqs,
    # the rest to its --engine-args; both reach vLLM.
    tcfg = TeacherConfig(model=teacher_path, dtype="float32", max_model_len=256, cpus=2.0,
                         engine_args={"max_num_seqs": 7, "enable_prefix_caching": False})
    handle = start_teacher(tcfg, teacher_path, tmp_path)
    try:
        assert handle.self_started
        booked = ray.get(handle.actor.resources.remote())
        assert booked["assigned"].get("CPU") == 2.0 and not booked["gpu_ids"]  # CPU run: no GPU
        assert booked["node_id"] == ray.get_runtime_context().get_node_id()
        assert handle.url.startswith("http://127.0.0.1:")  # the driver's node: loopback only
        # The server takes requests only with the key made for this run,
        # which the client reads from a file only this user can read.
        assert stat.S_IMODE(os.stat(handle.api_key_file).st_mode) == 0o600
        key = open(handle.api_key_file).read().strip()
        assert len(key) >= 32
        status, body = _get(handle.url + "/v1/model")
        assert status == 401, body
        status, body = _get(handle.url + "/v1/model", key)
        assert status == 200 and body["model"] == teacher_path and body["dtype"] == "float32", body
        log = (tmp_path / LOG_NAME).read_text()
        assert "teacher_server ready" in log and key not in log
        settings = json.loads(re.search(r"teacher_server engine: (\{.*\})", log).group(1))
        assert (settings["max_num_seqs"], settings["enable_prefix_caching"]) == (7, False), settings
        server = psutil.Process(ray.get(handle.actor.pid.remote()))
        assert "TeacherServerActor" in " ".join(psutil.Process(server.ppid()).cmdline())  # a child of the actor
    finally:
        handle.stop()
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(handle.api_key_file)  # the run's key goes with the server
    with pytest.raises(OSError):
        urllib.request.urlopen(handle.url + "/health", timeout=5)


def test_a_teacher_that_dies_at_start_fails_fast_with_its_log(ray_session, tmp_path):
    missing = str(tmp_path / "no-such-model")
    tcfg = TeacherConfig(model=missing, dtype="float32", max_model_len=256, startup_timeout_s=600.0)
    t0 = time.monotonic()
    with pytest.raises(TeacherStartError, match=r"teacher_server exited with code 1 before it was healthy; last "
                                                 r"lines of .*teacher_server\.log:\n") as ei:
        start_teacher(tcfg, missing, tmp_path)
    assert time.monotonic() - t0 < 300  # not the 600 s start-up timeout
    assert f"'{missing}'" in str(ei.value)  # the server's own error, from its log
