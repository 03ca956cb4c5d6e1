# `make test` and `make demo` set up everything themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo docs lint bench graphviz clean wheel-check

$(STAMP): pyproject.toml examples/plugin_package/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# setuptools in the venv too: the plugin-guide and wheel tests build without isolation, offline
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=77'
	$(BIN)/python -m pip install -q -e '.[dev,mpi,onnx,compare]'
	$(BIN)/python -m pip install -q -e examples/plugin_package
	touch $(STAMP)

# The `dot` renderer is a system package; install it when missing and we may (root + apt-get).
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null \
	      || echo "could not install graphviz; rendering tests will be skipped"; \
	  else echo "graphviz 'dot' not found: install it (apt-get install graphviz) to render images"; fi; }

test: $(STAMP) graphviz
	$(BIN)/ruff check graphengine plugins viz tests examples benchmarks docs
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory wheel-check

demo: $(STAMP) graphviz
	$(BIN)/graphengine demo vanishing --out demo_output

# Regenerate the committed pictures of docs/images from fresh runs (the README quotes these runs).
docs: $(STAMP) graphviz
	$(BIN)/graphengine demo vanishing --out demo_output --images docs/images
	$(BIN)/python examples/vanishing_gradients.py
	$(BIN)/python examples/autoencoder_digits.py
	$(BIN)/python examples/cnn_input_gradients.py
	$(BIN)/python examples/long_memory.py
	$(BIN)/python examples/optimizer_trajectories.py
	$(BIN)/python examples/ctc_speech.py
	$(BIN)/python examples/seq2seq_attention.py
	$(BIN)/python examples/word_vectors.py
	$(BIN)/python examples/gan.py
	$(BIN)/python examples/dqn_maze.py
	$(BIN)/python examples/transfer_learning.py
	$(BIN)/python docs/update_quotes.py

# The wheel, installed in a fresh virtual environment, works from a project that has its own
# plugins/ and viz/ packages (the editable install of $(VENV) cannot show what a wheel installs).
wheel-check: $(STAMP)
	$(BIN)/python tests/packaging/wheel_check.py

lint: $(STAMP)
	$(BIN)/ruff check graphengine plugins viz tests examples benchmarks docs

bench: $(STAMP)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) demo_output build *.egg-info
