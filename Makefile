# PixelLLM Studio — the two commands: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test install browser lint clean constraints

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PY)); set PY=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
browser:
	@test -x /usr/bin/chromium || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		(sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); }

demo: $(STAMP)
	$(BIN)/python app.py

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .

# After changing requirements.txt: resolve it afresh and pin every installed package (header kept).
constraints:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	grep -v '^-c ' requirements.txt > requirements.unpinned.txt  # resolved afresh, not under the old pins
	sed 's/^-r requirements.txt/-r requirements.unpinned.txt/' requirements-dev.txt > requirements-dev.unpinned.txt
	$(BIN)/pip install --quiet -r requirements-dev.unpinned.txt
	rm requirements.unpinned.txt requirements-dev.unpinned.txt
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
