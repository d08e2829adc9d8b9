"""How every fleet process connects to Redis: the password and the TLS options, from settings, in one place.

The redis-py clients (workers, the batching supervisor, remote control, the API's asyncio pool) and the Celery
app (broker and result backend; Flower runs on the same app) all take their URL and options from here, so that
``REDIS_PASSWORD`` / ``REDIS_PASSWORD_FILE`` and the ``REDIS_SSL_*`` settings reach every connection.

NOTE: the password travels inside the URL, not as a ``password=`` keyword: redis-py's ``from_url`` lets the URL's
own password win over a keyword, and kombu and Celery's result backend read credentials only from the URL.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis as redis_lib

from shared.settings import FleetSettings

#: ``REDIS_SSL_CERT_REQS`` as the ``ssl`` constants redis-py, kombu and Celery's backend expect.
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def password(settings: FleetSettings) -> str | None:
    """The Redis password the settings give, if any.

    Args:
        settings: Fleet settings.

    Returns:
        The stripped content of ``REDIS_PASSWORD_FILE``, else ``REDIS_PASSWORD``; None when neither is set (a
        password in ``REDIS_URL`` then applies).

    Raises:
        ValueError: both are set (which one is meant is unclear), or the file is empty.
        OSError: the file cannot be read.
    """
    if settings.redis_password_file is not None:
        if settings.redis_password is not None:
            raise ValueError("set REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both")
        # NOTE: read at each call, not cached: a client built after a rotated Secret was remounted gets the new one.
        secret = settings.redis_password_file.read_text().strip()
        if not secret:
            raise ValueError(f"REDIS_PASSWORD_FILE {settings.redis_password_file} is empty")
        return secret
    return settings.redis_password.get_secret_value() if settings.redis_password is not None else None


def is_tls(url: str) -> bool:
    """Whether ``url`` asks for TLS (``rediss://``)."""
    return urlsplit(url).scheme == "rediss"


def url(settings: FleetSettings) -> str:
    """``REDIS_URL`` with the password of the settings put in (URL-quoted); unchanged when they give none.

    Args:
        settings: Fleet settings.

    Returns:
        The URL every client and the Celery app connect with. It holds the password: never log it.
    """
    secret = password(settings)
    if secret is None:
        return settings.redis_url
    parts = urlsplit(settings.redis_url)
    host = parts.netloc.rpartition("@")[2]
    user = quote(unquote(parts.username), safe="") if parts.username else ""  # an ACL user stays
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(secret, safe='')}@{host}"))


def ssl_options(settings: FleetSettings) -> dict[str, Any]:
    """The TLS options of a ``rediss://`` connection, with the keys redis-py and kombu share.

    Args:
        settings: Fleet settings.

    Returns:
        ``ssl_cert_reqs`` (an ``ssl.CERT_*`` constant) and those of ``ssl_ca_certs``, ``ssl_certfile``,
        ``ssl_keyfile`` that are set; empty for a plain ``redis://`` URL.
    """
    # NOTE: a plain URL ignores REDIS_SSL_* on purpose: a deployment may set them always and switch TLS on with
    # the URL's scheme alone (docker-compose.yml does), and Celery's backend refuses ssl options on redis://.
    if not is_tls(settings.redis_url):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": CERT_REQS[settings.redis_ssl_cert_reqs]}
    for key, path in (("ssl_ca_certs", settings.redis_ssl_ca_certs), ("ssl_certfile", settings.redis_ssl_certfile),
                      ("ssl_keyfile", settings.redis_ssl_keyfile)):
        if path is not None:
            options[key] = str(path)
    return options


def client_kwargs(settings: FleetSettings) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``from_url`` (``redis.Redis``, ``redis.asyncio.BlockingConnectionPool``).

    Pass them with :func:`url`, which carries the password.

    Args:
        settings: Fleet settings.

    Returns:
        The TLS options for a ``rediss://`` URL, nothing otherwise.
    """
    return ssl_options(settings)


def client(settings: FleetSettings, **options: Any) -> redis_lib.Redis:
    """A synchronous redis-py client on the fleet's Redis.

    Args:
        settings: Fleet settings.
        **options: Further ``from_url`` keywords (timeouts, health checks) of the caller.

    Returns:
        The client (it connects lazily, on its first command).
    """
    return redis_lib.Redis.from_url(url(settings), **client_kwargs(settings), **options)


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """Celery settings of the broker and the result backend: URLs with the password, TLS for ``rediss://``.

    Args:
        settings: Fleet settings.

    Returns:
        ``broker_url`` and ``result_backend``, plus ``broker_use_ssl`` and ``redis_backend_use_ssl`` (kombu's
        keys: ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``) for a ``rediss://`` URL.
    """
    target = url(settings)
    config: dict[str, Any] = {"broker_url": target, "result_backend": target}
    tls = ssl_options(settings)
    if tls:
        # Two copies: Celery's result backend updates its connection parameters with the dict it is given.
        config.update(broker_use_ssl=dict(tls), redis_backend_use_ssl=dict(tls))
    return config
