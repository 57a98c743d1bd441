# The commands of the README: `make demo`, `make eval` and `make test` (ruff, then pytest). Each creates .venv
# if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo eval test setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels on a CPU machine.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The demo's checkpoints follow trainer.default_root_dir (runs/demo/lightning_logs/version_<n>/checkpoints):
# generate from the last.ckpt of the newest run.
DEMO_CKPT = $$(ls -td runs/demo/lightning_logs/version_*/checkpoints/last.ckpt | head -n 1)

demo: $(STAMP)
	$(VENV)/bin/diffusion-lm fit --config configs/demo.yaml
	$(VENV)/bin/diffusion-lm generate --model "$(DEMO_CKPT)" --preset quality \
		--prompt "Hello" --prompt "How are you doing?" --prompt "What are your interests" --prompt "do you drink" \
		--prompt "Привет!" --prompt "Как дела?" --prompt "Ты пьешь?" --prompt "Биржа"

# The evaluation report of the newest demo checkpoint (run `make demo` first): runs/eval/report.md.
eval: $(STAMP)
	$(VENV)/bin/diffusion-lm test --config configs/demo.yaml --config configs/eval/suite.yaml --ckpt_path "$(DEMO_CKPT)"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
