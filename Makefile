# The two quickstart commands: `make demo` and `make test`. Both install what they need first.
VENV := .venv
STAMP := $(VENV)/.asyncrl-installed

.PHONY: demo test lint

$(STAMP): pyproject.toml launch/setup.sh
	bash launch/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/asyncrl train configs/demo.yaml run.overwrite=true

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
