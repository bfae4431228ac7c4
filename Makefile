# Two commands on a fresh machine (see README):
#   make demo   set up .venv and chat with the embedded model, offline
#   make test   unit tests, doctests, the notebooks under nbval, the browser test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: an unpinned torch from PyPI pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
OFFLINE := QWEN_LAB_MODEL=qwen-lab/tiny-chat HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

.PHONY: demo test lab bench tiny-chat clean

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

demo: $(VENV)/.notebooks
	$(OFFLINE) $(BIN)/qwen-lab generate --prompt "What is the capital of France?" --stats
	$(OFFLINE) $(BIN)/qwen-lab generate --prompt "法國的首都是哪裡？"
	@echo "Next: make lab  (JupyterLab on notebooks/, start with 01_download.ipynb)"

test: $(VENV)/.test
	$(OFFLINE) $(BIN)/python -m pytest tests qwen_lab --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg

lab: $(VENV)/.notebooks
	$(BIN)/jupyter lab notebooks

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_gemv.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_compile.py

# Rebuild the embedded model from nothing (about 40 minutes on 2 cores), then grade it and
# write the figures into its model card. Re-execute the notebooks afterwards.
tiny-chat: $(VENV)/.test
	$(BIN)/python -m training.train
	$(BIN)/python -m training.evaluate

clean:
	rm -rf $(VENV) artifacts
