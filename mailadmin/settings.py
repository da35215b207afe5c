"""Settings for mailadmin.

This is the only module that reads ``os.environ``. Every setting an operator may change is
documented in the README under "Settings".
"""

import os
import secrets
import socket
from pathlib import Path

import dj_database_url
from django.conf.global_settings import LANGUAGES as DJANGO_LANGUAGES
from django.core.exceptions import ImproperlyConfigured

from mailadmin.mailin.lmtp.address import listen_address as lmtp_listen_address
from mailadmin.workercount import AUTO, parse_worker_count

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("MAILADMIN_VAR_DIR", BASE_DIR / "var"))


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_number(name: str, default: float, kind: type = int):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number ({kind.__name__}), got {value!r}") from None


def gettext_noop(message: str) -> str:
    """Marks a default text for the catalogue without touching the translation machinery, which
    would read these settings while they are still being defined (Django's advice for settings)."""
    return message


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_period(name: str, default: float) -> float:
    """Seconds between two runs of something periodic: more than 0."""
    seconds = _env_float(name, default)
    if not seconds > 0:
        raise ImproperlyConfigured(f"{name} must be a number of seconds above 0, got {seconds!r}")
    return seconds


def _env_prepare_threshold(name: str, default: int) -> int | None:
    """psycopg's ``prepare_threshold``: a whole number of runs, or ``off`` (None: never prepare)."""
    value = (os.environ.get(name) or "").strip().lower()
    if value == "off":
        return None
    threshold = _env_int(name, default)
    if threshold < 0:
        raise ImproperlyConfigured(f"{name} must be 0 or more, or 'off'")
    return threshold


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _env_workers(name: str) -> int:
    """A worker count: a whole number, or ``auto`` (the default) for one per usable CPU."""
    try:
        return parse_worker_count(os.environ.get(name) or AUTO)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {AUTO!r} or a number of at least 1") from None


def _private_var_dir() -> Path:
    """var/ holds the database, its key and TLS files: created readable by its owner only."""
    VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    return VAR_DIR


def _local_secret_key() -> str:
    """A key generated once into var/ so every command works from a fresh shell in the checkout.

    Production sets SECRET_KEY (the same on every host); without it, each host keeps its own.
    """
    key_file = _private_var_dir() / "secret_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


DEBUG = _env_bool("DEBUG", False)

SECRET_KEY = os.environ.get("SECRET_KEY", "") or _local_secret_key()

ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "daphne",
    "mailadmin.console.apps.ConsoleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "mailadmin.apps.MailadminConfig",
    "mailadmin.api.apps.ApiConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # After the session (a chosen language is kept there), before CommonMiddleware (redirects).
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: it puts the stack above in sync mode, one thread hop per request (see the module).
    "mailadmin.middleware.SyncMiddlewareChain",
]

ROOT_URLCONF = "mailadmin.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "mailadmin.asgi.application"

# --- Database -------------------------------------------------------------------------------
# SQLite is the embedded default for one host. WAL lets readers (POP3 sessions) run beside the
# one writer; BEGIN IMMEDIATE takes the write lock up front, so two writers queue on the busy
# timeout instead of deadlocking on a read-to-write lock upgrade.
SQLITE_BUSY_TIMEOUT_SECONDS = 30

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'mailadmin.sqlite3'}",
        conn_max_age=_env_int("DATABASE_CONN_MAX_AGE", 0),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _private_var_dir()
    # Django's backend, with writers from several processes queued on a lock file.
    DATABASES["default"]["ENGINE"] = "mailadmin.sqlite"
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
    }
    # A file, not :memory:, so tests can share the database with worker processes.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_mailadmin.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # libpq gives up on a server that accepts the connection but never completes it, and TCP
    # keepalives find a peer that vanished (a host gone, a firewall dropping the flow): without
    # them a daemon's thread waits forever and the process cannot stop promptly.
    DATABASES["default"]["OPTIONS"] = {
        "connect_timeout": _env_int("DATABASE_CONNECT_TIMEOUT", 10),
        "keepalives": 1,
        "keepalives_idle": _env_int("DATABASE_KEEPALIVES_IDLE", 60),
        "keepalives_interval": _env_int("DATABASE_KEEPALIVES_INTERVAL", 10),
        "keepalives_count": _env_int("DATABASE_KEEPALIVES_COUNT", 6),
        # The store's hot statements (``fastsql.prepared_cursor``) bind their parameters on the
        # server and are prepared after they have run this many times on a connection; the ORM's
        # cursors bind on the client and are never prepared, whatever this says.
        "prepare_threshold": _env_prepare_threshold("DATABASE_PREPARE_THRESHOLD", 5),
        **DATABASES["default"].get("OPTIONS", {}),
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channels -------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Authentication -------------------------------------------------------------------------
PASSWORD_HASHERS = [
    # Django's argon2, checked in memory kept between checks on runpop3's hashing threads.
    "mailadmin.hosting.argon2hasher.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    # Dovecot's {SCHEME} hashes, imported from a Dovecot host; argon2 replaces each at its first login.
    "mailadmin.hosting.dovecothashes.DovecotPasswordHasher",
]

# ModelBackend, with an upgrade of an outdated hash that cannot overwrite a password set meanwhile.
AUTHENTICATION_BACKENDS = ["mailadmin.hosting.authbackend.HashUpgradingBackend"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]


# --- Internationalisation, static files -----------------------------------------------------
# The admin follows the browser's Accept-Language among LANGUAGES (codes, e.g. "en,id"); the
# first is the default, for the admin and for quota warnings of domains that name none.
def _languages(codes: list[str]) -> list[tuple[str, str]]:
    names = dict(DJANGO_LANGUAGES)
    unknown = [code for code in codes if code not in names]
    if unknown:
        raise ImproperlyConfigured(f"LANGUAGES names codes Django does not know: {', '.join(unknown)}")
    return [(code, names[code]) for code in codes]


LANGUAGES = _languages(
    [code.strip().lower() for code in (os.environ.get("LANGUAGES") or "en,id").split(",") if code.strip()]
)
LANGUAGE_CODE = LANGUAGES[0][0]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# --- HTTPS ------------------------------------------------------------------------------------
# Off DEBUG the console is HTTPS only: cookies never travel in clear, browsers remember HSTS.
# Behind a TLS-terminating proxy, set SECURE_PROXY_SSL_HEADER to the header it sets, e.g.
# "X-Forwarded-Proto: https" (only when the proxy strips that header from clients' requests).
SECURE_SSL_REDIRECT = _env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = _env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = _env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = _env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _env_bool("SECURE_HSTS_PRELOAD", False)
_proxy_header = os.environ.get("SECURE_PROXY_SSL_HEADER", "")
if _proxy_header:
    _name, _, _value = _proxy_header.partition(":")
    if not _value.strip():
        raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER must look like 'X-Forwarded-Proto: https'")
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _name.strip().upper().replace("-", "_"), _value.strip())
# Serve the admin's assets straight from the apps in development; run collectstatic otherwise.
WHITENOISE_USE_FINDERS = DEBUG

# --- Mail store -----------------------------------------------------------------------------
# Bodies live in chunk rows of this size: large enough that a 50 MiB message is ~200 rows,
# small enough that no code path holds a whole message in memory (RETR holds the chunk being
# sent and the larger of POP3_READAHEAD_BYTES and a chunk read on).
MAILADMIN_CHUNK_SIZE_BYTES = _env_int("MAILADMIN_CHUNK_SIZE_BYTES", 256 * 1024)
MAILADMIN_MAX_MESSAGE_SIZE_BYTES = _env_int("MAILADMIN_MAX_MESSAGE_SIZE_BYTES", 50 * 1024 * 1024)
# Crossing one of these usage percentages delivers a warning into the mailbox (per-domain
# override in the admin). {address}, {percent}, {used} and {quota} are filled in.
MAILADMIN_QUOTA_WARNING_PERCENTS = os.environ.get("MAILADMIN_QUOTA_WARNING_PERCENTS", "80,95")
MAILADMIN_QUOTA_WARNING_FROM = os.environ.get("MAILADMIN_QUOTA_WARNING_FROM", "postmaster")
# The defaults are translated into the domain's language; a text set here is sent as it is.
MAILADMIN_QUOTA_WARNING_SUBJECT = os.environ.get(
    "MAILADMIN_QUOTA_WARNING_SUBJECT",
    # xgettext:no-python-format
    gettext_noop("Your mailbox is {percent}% full"),
)
MAILADMIN_QUOTA_WARNING_BODY = os.environ.get(
    "MAILADMIN_QUOTA_WARNING_BODY",
    gettext_noop(
        "Your mailbox {address} uses {used} of its {quota} ({percent}%).\n"
        "When it is full, new mail will be refused. Please delete messages you no longer need.\n"
    ),
)
# The admin shows at most this much of a message's text to those allowed to read it.
MAILADMIN_ADMIN_BODY_BYTES = _env_int("MAILADMIN_ADMIN_BODY_BYTES", 256 * 1024)
# Header blocks are read up to this size for the subject and sender kept on the message row.
MAILADMIN_HEADER_CACHE_BYTES = 64 * 1024
# Ended POP3 sessions and failed logins older than this many days go at `prunehistory`.
MAILADMIN_HISTORY_DAYS = _env_int("MAILADMIN_HISTORY_DAYS", 30)
# The hourly figures the console's charts read (what prunehistory rolled up) are kept this long.
MAILADMIN_FIGURES_DAYS = _env_int("MAILADMIN_FIGURES_DAYS", 365)
# /metrics answers only when this is set, and then only to "Authorization: Bearer <token>".
MAILADMIN_METRICS_TOKEN = os.environ.get("MAILADMIN_METRICS_TOKEN", "")


# --- POP3 (runpop3) -------------------------------------------------------------------------
POP3_BIND = os.environ.get("POP3_BIND", "127.0.0.1")
POP3_PORT = _env_int("POP3_PORT", 1110)
POP3S_PORT = _env_int("POP3S_PORT", 1995)
POP3_TLS_CERTFILE = os.environ.get("POP3_TLS_CERTFILE", "")
POP3_TLS_KEYFILE = os.environ.get("POP3_TLS_KEYFILE", "")
POP3_TLS_HANDSHAKE_TIMEOUT = _env_float("POP3_TLS_HANDSHAKE_TIMEOUT", 10.0)
# Networks (CIDR) allowed to log in without TLS, besides loopback.
POP3_TRUSTED_NETWORKS = _env_list("POP3_TRUSTED_NETWORKS")
POP3_GREETING = os.environ.get("POP3_GREETING", "POP3 server ready.")
POP3_LOGIN_TIMEOUT = _env_float("POP3_LOGIN_TIMEOUT", 180.0)
POP3_IDLE_TIMEOUT = _env_float("POP3_IDLE_TIMEOUT", 600.0)
POP3_MAX_CONNECTIONS = _env_int("POP3_MAX_CONNECTIONS", 10000)
POP3_MAX_CONNECTIONS_PER_IP = _env_int("POP3_MAX_CONNECTIONS_PER_IP", 100)
# Seconds before a failed login is answered, and the cap of the per-source penalty added to it
# for repeated failures (Dovecot: 2 s, growing 2-4-8 up to 15 s).
POP3_AUTH_FAILURE_DELAY = _env_float("POP3_AUTH_FAILURE_DELAY", 2.0)
POP3_AUTH_PENALTY_MAX = _env_float("POP3_AUTH_PENALTY_MAX", 15.0)
POP3_AUTH_PENALTY_WINDOW = _env_int("POP3_AUTH_PENALTY_WINDOW", 900)
# Concurrent password verifications: Django's argon2 parameters cost ~100 MiB and ~0.1 s each.
POP3_AUTH_THREADS = _env_int("POP3_AUTH_THREADS", 2)
# Seconds a successful password verification is remembered (keyed hash, in memory); 0 = off.
POP3_AUTH_CACHE_TTL = _env_float("POP3_AUTH_CACHE_TTL", 300.0)
POP3_DB_THREADS = _env_int("POP3_DB_THREADS", 8)
# First chunks of the next messages a session holds ahead of its client: mailadmin.pop3d.maildrop.
POP3_READAHEAD_BYTES = max(0, _env_int("POP3_READAHEAD_BYTES", 512 * 1024))
# Messages of large mailboxes' login snapshots each runpop3 process keeps between sessions
# (about 250 bytes each; 0 keeps none): mailadmin.pop3d.snapshots.
POP3_SNAPSHOT_CACHE_MESSAGES = _env_int("POP3_SNAPSHOT_CACHE_MESSAGES", 200_000)
# Smaller mailboxes are read afresh at every login: it costs about what checking the kept copy does.
POP3_SNAPSHOT_CACHE_MIN_MESSAGES = max(1, _env_int("POP3_SNAPSHOT_CACHE_MIN_MESSAGES", 5000))
# Processes serving the listeners; "auto" (the default) is one per CPU this process may use.
POP3_WORKERS = _env_workers("POP3_WORKERS")
# daphne processes ``runweb`` (and so ``runall``) starts on the web port; "auto" is one per CPU.
WEB_WORKERS = _env_workers("WEB_WORKERS")
# Requests a web worker serves at once (its threads), and the database connections it keeps for them.
WEB_THREADS = max(1, _env_int("WEB_THREADS", 8))
# runpop3 and runlmtp with several workers keep each worker on one CPU (mailadmin.prefork).
DAEMON_PIN_WORKERS = _env_bool("DAEMON_PIN_WORKERS", True)
# runpop3 and runlmtp keep their worker threads' database connections this long (seconds).
DAEMON_DB_CONN_MAX_AGE = _env_int("DAEMON_DB_CONN_MAX_AGE", 600)
# Minimum seconds between two logins of one mailbox; advertised as LOGIN-DELAY. 0 = off.
POP3_LOGIN_DELAY = _env_int("POP3_LOGIN_DELAY", 0)
# A mailbox lock lapses this many seconds after its holder's last heartbeat.
POP3_LEASE_TTL = _env_float("POP3_LEASE_TTL", 60.0)
# How often a runpop3 process writes session rows, heartbeats and looks for kicks.
POP3_MONITOR_INTERVAL = _env_period("POP3_MONITOR_INTERVAL", 1.0)

# --- LMTP (runlmtp) -------------------------------------------------------------------------
# Read through a module of its own: the pipe's fast path finds runlmtp without these settings.
try:
    LMTP_BIND, LMTP_PORT, LMTP_SOCKET = lmtp_listen_address(os.environ)
except ValueError:
    raise ImproperlyConfigured(f"LMTP_PORT must be a number (int), got {os.environ['LMTP_PORT']!r}") from None
LMTP_SOCKET_MODE = int(os.environ.get("LMTP_SOCKET_MODE", "660"), 8)
LMTP_HOSTNAME = os.environ.get("LMTP_HOSTNAME", "") or socket.gethostname()
LMTP_MAX_RECIPIENTS = _env_int("LMTP_MAX_RECIPIENTS", 1000)
LMTP_MAX_LINE_BYTES = _env_int("LMTP_MAX_LINE_BYTES", 64 * 1024)
# Dovecot's quota_full_tempfail: by default a full mailbox is a temporary failure (452 4.2.2),
# so the MTA retries while the user makes room; on, it is permanent (552 5.2.2) and bounces.
LMTP_OVER_QUOTA_PERMANENT = _env_bool("LMTP_OVER_QUOTA_PERMANENT", False)
LMTP_IDLE_TIMEOUT = _env_float("LMTP_IDLE_TIMEOUT", 300.0)
# Threads per runlmtp process for its database work; 0: by database (see runlmtp.lmtp_config).
LMTP_DB_THREADS = _env_int("LMTP_DB_THREADS", 0)
LMTP_WORKERS = _env_workers("LMTP_WORKERS")
# Messages stored in one transaction at most when deliveries queue up (one commit for all).
LMTP_GROUP_COMMIT_MAX = max(1, _env_int("LMTP_GROUP_COMMIT_MAX", 64))
# Groups committing at once per runlmtp process on PostgreSQL (SQLite: always one).
LMTP_GROUP_WRITERS = max(1, _env_int("LMTP_GROUP_WRITERS", 2))
# How often a runlmtp process heartbeats (the console counts it alive meanwhile) and writes the
# refusals it counted since its last delivery.
LMTP_HEARTBEAT_INTERVAL = _env_float("LMTP_HEARTBEAT_INTERVAL", 5.0)

# --- Provisioning API (/api/v1/) ------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["mailadmin.api.authentication.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["mailadmin.api.permissions.TokenScope"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "mailadmin.api.pagination.Pages",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "mailadmin.api.errors.handle_exception",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "mailadmin provisioning API",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}
API_PAGE_SIZE = _env_int("API_PAGE_SIZE", 100)
API_MAX_PAGE_SIZE = 1000
# Proxies (CIDRs) whose X-Forwarded-For names the client; from anywhere else the header is ignored.
API_TRUSTED_PROXIES = _env_list("API_TRUSTED_PROXIES")
# A source (an IPv4 address, an IPv6 /48) that failed to authenticate this many times within
# the window gets 429 until its oldest failure leaves the window; counted in the database.
API_AUTH_FAILURE_LIMIT = _env_int("API_AUTH_FAILURE_LIMIT", 10)
API_AUTH_FAILURE_WINDOW = _env_int("API_AUTH_FAILURE_WINDOW", 300)
# A token's last use is written at most this often (seconds), so busy clients cost no write per request.
API_LAST_USED_INTERVAL = 60
# An Idempotency-Key's first answer is replayed for this long (seconds).
API_IDEMPOTENCY_TTL = 24 * 3600
# Largest request body read (the import of 10,000 pre-hashed mailboxes is about 2 MiB).
DATA_UPLOAD_MAX_MEMORY_SIZE = _env_int("API_MAX_BODY_BYTES", 16 * 1024 * 1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
