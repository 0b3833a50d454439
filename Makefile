# llmfn developer commands. `make train` and `make test` set up the environment themselves.
# uv on PATH, else the copy `make init` installs with pip (run as a module).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: init train test test-all lint fmt bench clean

init:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync
	@# the ruff hooks of .pre-commit-config.yaml, in a git checkout (not in an unpacked archive)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		$(UV) run --no-sync pre-commit install >/dev/null || echo "note: pre-commit hooks not installed"; \
	fi

train: init
	$(UV) run python -m llmfn.train configs/tiny.yaml $(ARGS)

test: init
	$(UV) run pytest -q -m "not slow"

test-all: init
	$(UV) run pytest -q

lint: init
	$(UV) run ruff check .
	$(UV) run ruff format --check .

fmt: init
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

bench: init
	$(UV) run python bench/train_throughput.py
	$(UV) run python bench/decode_throughput.py
	$(UV) run python bench/decode_kernels.py
	$(UV) run python bench/data_throughput.py
	$(UV) run python bench/optim_update.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache runs .cache
