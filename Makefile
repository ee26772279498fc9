# bocompress: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv pg clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, the CPU build: nothing after it may pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# -c: nothing may replace the CPU torch; editable_mode=compat: a path entry on sys.path, so the
	# clone's own folder (often named bocompress too) never shadows the package (docs/models.md)
	$(BIN)/pip install -q -c constraints/cpu-torch.txt --config-settings editable_mode=compat -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/bocompress demo

pg:
	@pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && exit 0; sleep 1; done; echo "PostgreSQL did not come up"; exit 1

test: $(STAMP) pg
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
