# The two set-up commands of the README:
#   make quickstart   - install, then train a small LayerNorm and PowerNorm transformer and compare
#   make test         - install, then run the test-suite (what CI runs)
PYTHON ?= python3
STAMP := .install.stamp

.PHONY: install quickstart test benchmarks

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.py
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	bash recipes/quickstart/run.sh

test: $(STAMP)
	$(PYTHON) -m pytest -q

benchmarks: $(STAMP)
	$(PYTHON) benchmarks/norm_speed.py
