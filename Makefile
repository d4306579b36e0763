# The same targets serve people and CI. Setup is idempotent: a second run is quick.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DURATION ?= 60

.PHONY: setup demo test lint format bench bench-quality bench-all clean broker

setup: $(STAMP) broker

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build; a bare requirement would pull a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[train,dev]'
	touch $(STAMP)

# mosquitto (the broker for tests and the demo), nats-server (the partitioned broker of the
# scale-out tests), promtool (checks the alert rules) and amtool (checks the Alertmanager
# config) from Debian's packages when root; otherwise say what to install.
broker:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } && { command -v nats-server >/dev/null 2>&1 || test -x /usr/sbin/nats-server; } && command -v promtool >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      mosquitto mosquitto-clients nats-server prometheus prometheus-alertmanager; \
	  else \
	    echo "missing: run 'sudo apt-get install mosquitto mosquitto-clients nats-server prometheus prometheus-alertmanager'"; \
	    echo "(the demo and the integration tests need mosquitto, the scale-out test nats-server; the rules' tests need promtool)"; \
	  fi; }

demo: setup
	$(BIN)/rnnsentry demo --duration $(DURATION)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy detector

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks print their figures; they are not tests. Each takes under 5 minutes.
PERF_BENCHES := bench/step.py bench/throughput.py bench/latency.py bench/memory.py bench/train_speed.py
bench: setup
	@for b in $(PERF_BENCHES); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Detection quality on ../shared/datasets (NAB + SKAB dev subsets), and the long-memory study.
bench-quality: setup
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/demo.py
	$(BIN)/python bench/building.py

bench-all: bench bench-quality
	$(BIN)/python bench/long_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
