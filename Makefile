# Two commands on a fresh machine (see README):
#   make demo   set up .venv and chat with the embedded model, offline
#   make test   unit tests, doctests, the notebooks under nbval, the browser test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# TORCH is what pip installs first. Here `torch==2.13.0` finds this machine's CPU wheel; elsewhere
# on Linux, PyPI's torch==2.13.0 is the CUDA build (gigabytes of NVIDIA libraries). The CPU-only
# build (about 190 MB) comes from PyTorch's own index:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# (on a GPU machine, PyPI's own build is the one to have). It takes effect when .venv is created.
TORCH  ?= torch==2.13.0
OFFLINE := QWEN_LAB_MODEL=qwen-lab/tiny-chat HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
# make wheelhouse: where the wheels go, and which extras of the kit they cover
# (notebooks,workshop for a hub server too).
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_EXTRAS ?= notebooks
PROXY_STAMP := workshop/node_modules/.installed

.PHONY: demo test lab bench tiny-chat clean doctor wheelhouse workshop-proxy hub gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)

$(VENV)/.notebooks: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[notebooks]"
	touch $@

$(VENV)/.test: $(VENV)/.notebooks
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.workshop: $(VENV)/.notebooks
	$(BIN)/python -m pip install -q -e ".[workshop]"
	touch $@

demo: $(VENV)/.notebooks
	$(OFFLINE) $(BIN)/qwen-lab generate --prompt "What is the capital of France?" --stats
	$(OFFLINE) $(BIN)/qwen-lab generate --prompt "法國的首都是哪裡？"
	@echo "Next: make lab  (JupyterLab, opening notebooks/01_download.ipynb)"

test: $(VENV)/.test
	$(OFFLINE) $(BIN)/python -m pytest tests qwen_lab --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 300

# The repository as the server's root, so the notebooks' links to the README and the modules open;
# JupyterLab starts on the first notebook.
lab: $(VENV)/.notebooks
	$(BIN)/jupyter lab --ServerApp.root_dir=. notebooks/01_download.ipynb

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_gemv.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_compile.py

# Rebuild the embedded model from nothing (about 40 minutes on 2 cores), then grade it and
# write the figures into its model card. Re-execute the notebooks afterwards.
tiny-chat: $(VENV)/.test
	$(BIN)/python -m training.train
	$(BIN)/python -m training.evaluate

# Is this machine ready for the walkthrough, offline? One line per check (qwen_lab/doctor.py).
doctor: $(VENV)/.notebooks
	$(BIN)/qwen-lab doctor

# Every wheel the kit needs, for a room without network (docs/workshop.md): the kit itself, torch as
# TORCH says, and the rest, binary wheels only, for this machine's Python and platform. The last
# line checks that pip can install the kit, with the extras asked for, from the folder alone. In the room:
#   pip install --no-index --find-links wheelhouse "qwen-lab[notebooks]"    (or [notebooks,workshop])
# (build/ is setuptools' scratch, emptied first: a module deleted since the last build must not ride along.)
wheelhouse: $(VENV)/.notebooks
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	rm -rf build/lib build/bdist.*
	$(BIN)/python -m pip wheel -q --no-deps --wheel-dir $(WHEELHOUSE) .
	$(BIN)/python -m pip download -q --only-binary=:all: --dest $(WHEELHOUSE) $(TORCH)
	$(BIN)/python -m pip download -q --only-binary=:all: --dest $(WHEELHOUSE) --find-links $(WHEELHOUSE) \
	    "$(firstword $(TORCH))" "$$(ls $(WHEELHOUSE)/qwen_lab-*.whl)[$(WHEELHOUSE_EXTRAS)]"
	$(OFFLINE) $(BIN)/python -c 'import sys, pathlib, qwen_lab.doctor as d; c = d.check_wheelhouse(pathlib.Path(sys.argv[1]), sys.argv[2]); print(c.line()); sys.exit(c.status == "FAIL")' \
	    $(WHEELHOUSE) "qwen-lab[$(WHEELHOUSE_EXTRAS)]"

# JupyterHub's proxy, from npm, into workshop/node_modules (the versions of workshop/package-lock.json).
workshop-proxy: $(PROXY_STAMP)
$(PROXY_STAMP): workshop/package.json workshop/package-lock.json
	cd workshop && npm ci --no-audit --no-fund
	touch $@

# The room's JupyterHub on this machine: set QWEN_LAB_HUB_PASSWORD and the rest first
# (workshop/room.py lists them; docs/workshop.md walks through it); HUB_ARGS="--port 8443 --ssl-key ..." adds
# options (the hub's user cannot bind a port below 1024).
HUB_ARGS ?=
hub: $(VENV)/.workshop $(PROXY_STAMP)
	$(BIN)/jupyterhub -f workshop/jupyterhub_config.py $(HUB_ARGS)

# Every check that needs a GPU (scripts/gpu_check.py, a few minutes): on a GPU machine, in a .venv
# made with a CUDA build of torch (on Linux, PyPI's torch==2.13.0 is one).
# GPU_CHECK_ARGS=--cpu-bench adds the CPU's decode benchmarks (about 4 minutes more).
GPU_CHECK_OUT ?= artifacts/gpu-check
GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.test
	$(BIN)/python scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) artifacts
