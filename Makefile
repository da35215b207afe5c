# Entry points: `make run` (demo on a fresh machine) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# Two cores here; pytest-xdist spreads independent tests over them.
TEST_JOBS ?= 2
HTTP_PORT ?= 8000
TLS_DIR := var/tls

export DEBUG ?= 1

# Real mail clients the end-to-end tests talk to, the tools that make the Dovecot hashes the
# migration tests import, the Dovecot the bench runs beside ours, the bench's HTTP load generator
# (wrk) and gettext for the catalogue (Debian package: command, or a file it installs).
CLIENT_PACKAGES := fetchmail:fetchmail getmail6:getmail mpop:mpop curl:curl openssl:openssl \
	postfix:postfix swaks:swaks chromium:chromium dovecot-core:doveadm whois:mkpasswd \
	dovecot-pop3d:/usr/lib/dovecot/pop3 dovecot-lmtpd:/usr/lib/dovecot/lmtp gettext:xgettext \
	postfix-pgsql:/usr/lib/postfix/postfix-pgsql.so wrk:wrk

.PHONY: install system-deps run test test-only lint bench clean

install: $(STAMP)

# What running needs (make run); the test and bench tools come on top (make test, make bench).
$(RUN_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(TLS_DIR)/cert.pem:
	mkdir -p $(TLS_DIR)
	openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=localhost \
		-addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
		-keyout $(TLS_DIR)/key.pem -out $(TLS_DIR)/cert.pem 2>/dev/null
	chmod 600 $(TLS_DIR)/key.pem

run: $(RUN_STAMP) $(TLS_DIR)/cert.pem
	$(PY) manage.py migrate --noinput
	$(PY) manage.py setupdemo
	POP3_TLS_CERTFILE=$(TLS_DIR)/cert.pem POP3_TLS_KEYFILE=$(TLS_DIR)/key.pem \
		$(PY) manage.py runall --demo --http-port $(HTTP_PORT)

# Installs missing client programs with apt-get when run as root; otherwise their tests skip.
# Postfix is preseeded to "No configuration" (no questions, no main.cf, no system instance on
# port 25); should the package start one anyway, it is stopped: the tests run their own. So is
# a system Dovecot (ports 110, 995, 143, 993), and disabled: the bench starts its own.
system-deps:
	@missing=$$(for entry in $(CLIENT_PACKAGES); do command -v $${entry#*:} >/dev/null \
		|| [ -x /usr/sbin/$${entry#*:} ] || [ -e $${entry#*:} ] || echo $${entry%%:*}; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		postfix stop 2>/dev/null || true; \
		systemctl disable --now dovecot.service 2>/dev/null || true; \
		update-rc.d dovecot disable 2>/dev/null || true; doveadm stop 2>/dev/null || true; \
	elif [ -n "$$missing" ]; then echo "not installed (their tests will skip): $$missing"; fi

test: install system-deps test-only

# The POP3 library's own tests first, with pytest-django off: they prove pop3/ needs no Django.
test-only:
	$(PY) -m pytest -p no:django -W ignore::pytest.PytestConfigWarning -q pop3/tests
	$(PY) -m pytest -n $(TEST_JOBS) --durations=15 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The benchmark suite (bench/, docs/benchmarks.md) against live runpop3/runlmtp: SQLite by
# default, PostgreSQL with DATABASE_URL=postgres://...; e.g. BENCH_ARGS="--seconds 30".
# Dovecot (from system-deps) runs beside them in the same run; without it its side is skipped.
.PHONY: bench-smoke
bench: install system-deps
	$(PY) -m bench $(BENCH_ARGS)

# Every scenario for about a second on tiny corpora, so the bench never rots (.ci/run).
bench-smoke: install system-deps
	$(PY) -m bench --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis

# The Indonesian catalogue (locale/id): collect every translatable string of ours into the .po
# (translate the new ones there), then compile the .mo committed beside it. Needs gettext.
MESSAGES_IGNORE := --ignore '.venv/*' --ignore 'var/*' --ignore 'tests/*' --ignore 'bench/*' \
	--ignore 'pop3/*' --ignore 'docs/*'
.PHONY: messages
messages: install
	$(PY) manage.py makemessages --locale id --add-location file --no-obsolete $(MESSAGES_IGNORE)
	$(PY) manage.py compilemessages --locale id $(MESSAGES_IGNORE)
