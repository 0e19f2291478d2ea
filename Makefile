# ensam: two commands on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STUDIES ?= sample-datasets/studies
PORT ?= 8000
HOST ?= 127.0.0.1
export MONAI_LABEL_TRACKING_ENABLED ?= false
export PYTHONPATH := $(CURDIR)/apps/ensam:$(PYTHONPATH)

.PHONY: venv data services serve test eval bench pretrain clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -e '.[test,train]'
	touch $@

venv: $(VENV)/.installed

sample-datasets/.fetched: $(VENV)/.installed scripts/fetch_sample_data.py $(wildcard scripts/sample_data/*.py)
	$(VPY) scripts/fetch_sample_data.py --out sample-datasets
	touch $@

data: sample-datasets/.fetched

# System packages for tests/test_orthanc_ohif.py (a real Orthanc + a real headless browser on OHIF) and
# tests/test_replicas.py (server replicas behind a real nginx, deploy/nginx/ensam.conf). Installed with apt-get when
# missing and we are root; otherwise a warning, and those tests skip naming what is missing. In CI (CI=true,
# .ci/run) a package that cannot be installed is an error: the run stops here.
SERVICES_DEB := orthanc orthanc-dicomweb orthanc-gdcm chromium chromium-driver nginx
services:
	@missing=""; for p in $(SERVICES_DEB); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "WARNING: make services: not installed:$$missing (needs root and apt-get); the Orthanc/OHIF/nginx tests will skip"; \
		if [ "$(CI)" = true ]; then echo "make services: CI=true: every test must run" >&2; exit 1; fi; \
		exit 0; fi; \
	echo "make services: apt-get install$$missing"; export DEBIAN_FRONTEND=noninteractive; \
	{ apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; } \
	|| { echo "WARNING: make services: apt-get failed for$$missing; the Orthanc/OHIF/nginx tests will skip"; \
	     if [ "$(CI)" = true ]; then echo "make services: CI=true: every test must run" >&2; exit 1; fi; }

# `python -m monailabel.main`, not the `monailabel` wrapper script (it runs whatever `python` is first on PATH).
# lib.server:app (the non-blocking infer route) is importable because PYTHONPATH holds apps/ensam (see above).
serve: venv data
	@if [ "$$(id -u)" = 0 ]; then echo "WARNING: make serve runs the server as root; deploy it as an unprivileged user (deploy/ensam.service, README 'Access')" >&2; fi
	$(VPY) -m monailabel.main start_server --app apps/ensam --studies $(STUDIES) --conf models ensam \
		--host $(HOST) --port $(PORT) --uvicorn_app lib.server:app $(SERVE_ARGS)

test: venv data services
	$(VPY) -m pytest -q -rs tests

eval: venv data
	$(VPY) -m lib.evaluation --data sample-datasets/eval --out eval-results --start box,click

# BENCH_ARGS="--only click-path" runs only the click path (HTTP and engine alone side by side, issue 11)
bench: venv data
	$(VPY) -m lib.benchmark $(BENCH_ARGS)

# The labelling loop simulator (issue 29; docs/LABELLING_LOOP.md): LOOP_ARGS="--orders first,random,uncertainty ..."
.PHONY: loop
loop: venv data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VPY) -m lib.experiments.labelling_loop $(LOOP_ARGS)

pretrain: venv data
	$(VPY) -m lib.training.pretrain --config apps/ensam/lib/training/pretrain.yaml --resume

clean:
	rm -rf $(VENV) sample-datasets/.fetched
