# Setup and tests. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
# The torch/torchvision pair installed when the venv has no torch yet. On a CUDA workstation
# that wants another build, install it into .venv first (or set TORCH); it is then kept.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
TEST_ENV := NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
# Where test-slurm's single-node cluster keeps its config, state, logs and PID files.
SLURM_DIR ?= /tmp/fgvr-slurm

.PHONY: install test test-slow test-slurm clean

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH)
	# Freeze whatever torch/torchvision the venv now has, so no later resolve can replace them.
	$(BIN)/python -c "import torch, torchvision; v = lambda m: m.__version__.split('+')[0]; print(f'torch=={v(torch)}\ntorchvision=={v(torchvision)}')" > $(VENV)/torch-constraints.txt
	PIP_CONSTRAINT=$(VENV)/torch-constraints.txt $(BIN)/pip install -e '.[dev]'
	@$(BIN)/python -c "import torch, timm, hydra, albumentations; print('fgvr installed: torch', torch.__version__, '| timm', timm.__version__)"

# lint-imports: the layers of fgvr/ (pyproject.toml's [tool.importlinter]) before any test runs.
test:
	$(BIN)/lint-imports --no-cache
	$(TEST_ENV) $(BIN)/pytest -q -m "not slow and not slurm"

test-slow:
	$(TEST_ENV) $(BIN)/pytest -q -m "slow and not slurm"

# Brings up a real SLURM cluster on localhost (root; installs the Debian packages if missing),
# runs the tests marked slurm against it and stops it, whatever the tests did.
test-slurm:
	scripts/slurm_cluster.sh start $(SLURM_DIR)
	SLURM_CONF=$(SLURM_DIR)/slurm.conf $(TEST_ENV) $(BIN)/pytest -q -m slurm; \
	  status=$$?; scripts/slurm_cluster.sh stop $(SLURM_DIR); exit $$status

clean:
	rm -rf $(VENV) .pytest_cache
