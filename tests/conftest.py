"""Session-wide setup shared by every test.

The expensive parts (the tiny model builds, one Ray cluster, one
teacher_server process, one student sampler) are session fixtures in
tests/fixtures/, so the suite pays for each once.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports vLLM / wandb / Ray (they read these at import).
os.environ.setdefault("OPD_CACHE_DIR", str(REPO / ".cache" / "opd"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.teacher",   # one teacher_server process (teacher_server/)
    "tests.fixtures.vllm_server",  # vLLM's OpenAI server as a teacher (module scope)
    "tests.fixtures.sampler",   # one student sampler actor (rollout/)
]
