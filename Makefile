# mmvl: `make demo` trains the tiny CXR CLIP model on synthetic DICOMs, evaluates it, exports it to the model zoo
# and zero-shot classifies from the zoo entry; `make test` runs lint and the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# --isolated: ignore this machine's pip config/env (a local CPU-only torch wheel that breaks torchvision).
PIP := $(PY) -m pip --isolated --disable-pip-version-check
STAMP := $(VENV)/.mmvl-installed
DEMO_DATA := data/synthetic_cxr
DEMO_WORK := work_dirs/cxr_clip_tiny
DEMO_LABELS := pleural effusion,cardiomegaly,pneumothorax,nodule

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	# torchxrayvision only for its copy of the IU X-ray reports (datasets/iu_xray.py, the labeller tests); --no-deps
	# keeps its requirements (torch, scikit-image, ...) from moving constraints.txt's pins.
	$(PIP) install --no-deps torchxrayvision==1.5.7
	touch $(STAMP)

$(DEMO_DATA)/manifest.jsonl: datasets/synthetic.py | $(STAMP)
	$(PY) datasets/synthetic.py --out $(DEMO_DATA) --n 800 --size 128 --seed 0

demo: install $(DEMO_DATA)/manifest.jsonl
	$(PY) tools/check_data.py $(DEMO_DATA)/manifest.jsonl --config configs/demo/cxr_clip_tiny.py
	@if [ -d $(DEMO_WORK) ]; then echo "make demo: starting the demo afresh (removing the previous $(DEMO_WORK))"; \
		rm -rf $(DEMO_WORK); fi
	$(PY) tools/train.py configs/demo/cxr_clip_tiny.py --work-dir $(DEMO_WORK)
	$(PY) tools/zero_shot.py $(DEMO_WORK) --manifest $(DEMO_DATA)/test.jsonl \
		--labels "$(DEMO_LABELS)" --preset chexzero --out $(DEMO_WORK)/zero_shot_demo.csv
	$(PY) tools/evaluate.py $(DEMO_WORK) --manifest $(DEMO_DATA)/manifest.jsonl --task zero_shot \
		--labels "$(DEMO_LABELS)" --preset chexzero --out $(DEMO_WORK)/eval_zero_shot.json --plots $(DEMO_WORK)/plots
	$(PY) tools/export.py $(DEMO_WORK) --name cxr_clip_tiny --overwrite
	$(PY) tools/zero_shot.py cxr_clip_tiny --manifest $(DEMO_DATA)/test.jsonl \
		--labels "$(DEMO_LABELS)" --preset chexzero --out $(DEMO_WORK)/zero_shot_zoo.csv
	@echo "Work directory: $(DEMO_WORK) (config.py, metrics.jsonl, checkpoints/, tokenizer/, zero_shot_demo.csv,"
	@echo "  eval_zero_shot.json, plots/, zero_shot_zoo.csv); zoo entry: model_zoo/cxr_clip_tiny"

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) work_dirs $(DEMO_DATA)
