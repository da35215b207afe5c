# Entry points: `make run` (demo on a fresh machine) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Two cores here; pytest-xdist spreads independent tests over them.
TEST_JOBS ?= 2
HTTP_PORT ?= 8000
TLS_DIR := var/tls

export DEBUG ?= 1

.PHONY: install run test test-only bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(TLS_DIR)/cert.pem:
	mkdir -p $(TLS_DIR)
	openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=localhost \
		-addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
		-keyout $(TLS_DIR)/key.pem -out $(TLS_DIR)/cert.pem 2>/dev/null
	chmod 600 $(TLS_DIR)/key.pem

run: install $(TLS_DIR)/cert.pem
	$(PY) manage.py migrate --noinput
	$(PY) manage.py setupdemo --http-port $(HTTP_PORT)
	POP3_TLS_CERTFILE=$(TLS_DIR)/cert.pem POP3_TLS_KEYFILE=$(TLS_DIR)/key.pem \
		$(PY) manage.py runall --http-port $(HTTP_PORT)

test: install test-only

test-only:
	$(PY) -m pytest -n $(TEST_JOBS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
