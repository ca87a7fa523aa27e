# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it first.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STUDIO  := $(VENV)/bin/erasure-studio
STAMP   := $(VENV)/.installed

.PHONY: install demo test chromium

install: $(STAMP) chromium

$(PYTHON):
	python3 -m venv $(VENV)

# Reinstalls only when pyproject.toml changes (or the stamp is deleted).
$(STAMP): pyproject.toml | $(PYTHON)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

# Headless Chromium for tests/test_ui_browser.py, from Debian's packages (CI runs as root). Runs apt-get only when
# /usr/bin/chromium or /usr/bin/chromedriver is missing; without root it says what to install instead.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
		else \
			echo "note: install chromium and chromium-driver (apt-get) to run tests/test_ui_browser.py" >&2; \
		fi; \
	fi

demo: $(STAMP)
	@$(STUDIO) methods --json | $(PYTHON) -c 'import json, sys; sys.exit(not any(m["name"] == "esd" for m in json.load(sys.stdin)))' \
		|| { echo "MiniCanvas erasure demo not yet available: the quickstart's erasure method 'esd' is not implemented yet (see: $(STUDIO) methods)" >&2; exit 1; }
	$(STUDIO) erase configs/jobs/quickstart.yaml --overwrite

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests
