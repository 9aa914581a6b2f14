# Two targets do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -q

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# aarch64 device libraries link with the Debian cross gcc; install it when we can.
	@command -v aarch64-linux-gnu-gcc >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null 2>&1)) ; } || \
	  echo "note: aarch64-linux-gnu-gcc not installed; aarch64 targets will not link"
	touch $@

setup: $(VENV)/.installed

# Compile the bundled ResNet-18 with an automatic split and print the candidate table.
demo: setup
	$(BIN)/nasc-compile --split auto -o out/resnet18

# pytest exits 5 when it collects nothing; that is not a failure of the suite itself.
test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) out .pytest_cache
