PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve test bench bench-peers lint install

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

serve: $(BIN)/.installed
	$(BIN)/policy-server serve --host $(HOST) --port $(PORT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/policy-server bench
	SDL_VIDEODRIVER=dummy $(BIN)/python -m benchmarks.pixels
	$(BIN)/python -m benchmarks.oip
	$(BIN)/python -m benchmarks.programs
	$(BIN)/python -m benchmarks.peers.run

# the peers (TorchServe, PyTriton, LitServe, Ray Serve, MLServer) in .venv-peers/, then side by side
bench-peers: $(BIN)/.installed
	bash benchmarks/peers/install.sh
	$(BIN)/python -m benchmarks.peers.run --rounds 2
	$(BIN)/python -m benchmarks.peers.run --obs-per-request 32

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
