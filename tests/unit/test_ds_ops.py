"""Where the CPU learner's DeepSpeed shm op is built and loaded from (learner/ds_ops.py).

    .venv/bin/python -m pytest tests/unit/test_ds_ops.py -q
"""

import os
import sys

from learner import ds_ops


def test_build_dir_is_the_environments_own(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    venv.mkdir()
    assert ds_ops.env_build_dir(str(venv)) == str(venv / "torch_extensions")
    # Two environments never share a build folder (the per-user default root does).
    other = tmp_path / "other"
    other.mkdir()
    assert ds_ops.env_build_dir(str(other)) != ds_ops.env_build_dir(str(venv))


def test_read_only_prefix_gets_a_user_cache_folder_keyed_by_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_ops.os, "access", lambda p, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = ds_ops.env_build_dir("/usr"), ds_ops.env_build_dir("/opt/py")
    assert a.startswith(str(tmp_path / "torch_extensions" / "opd-")) and a != b
    assert ds_ops.env_build_dir("/usr") == a  # stable across processes


def test_use_env_build_dir_keeps_a_users_choice_and_puts_own_ninja_first(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ninja = bindir / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert ds_ops.use_env_build_dir() == str(tmp_path / "mine")
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bindir)
    ds_ops.use_env_build_dir()  # idempotent: not prepended twice
    assert os.environ["PATH"].split(os.pathsep).count(str(bindir)) == 1
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert ds_ops.use_env_build_dir() == ds_ops.env_build_dir()
