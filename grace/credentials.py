"""Credentials: read from the environment to connect, and never in what is recorded.

Everything GRACE writes for people to read (MLflow params and tags, the dataset's revision file,
error messages) passes a source or endpoint through ``redact_url`` first. A private data
repository's token comes from ``GRACE_GIT_TOKEN`` (in a cluster, a Kubernetes secret mounted as
that variable), is put into the URL only at the moment of connecting, and so is never a pipeline
parameter, which KFP would print in its task logs.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
# Query parameters that carry secrets: tokens, passwords, pre-signed S3 and Azure SAS signatures.
SECRET_QUERY = re.compile(r"token|secret|passw|signature|credential|^sig$|^key$|apikey", re.I)
GIT_TOKEN_ENV = "GRACE_GIT_TOKEN"
GIT_USER_ENV = "GRACE_GIT_USERNAME"
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a user:password or a secret query value."""
    return redact_url(url) != url


def redact_url(url: str) -> str:
    """``url`` with any userinfo and secret query values replaced by ``***``.

    Args:
        url: Any string; one that is not a ``scheme://`` URL is returned unchanged.

    Returns:
        The URL safe to log, e.g. ``https://***@git.example.com/a.git``.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc, query = parts.netloc, parts.query
        if "@" in netloc:
            netloc = f"{HIDDEN}@{netloc.rpartition('@')[2]}"
        pairs = parse_qsl(query, keep_blank_values=True) if query else []
        if any(SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, HIDDEN if SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*"
            )
    except ValueError:  # an unparseable URL: hide everything after the scheme
        return url.split("://", 1)[0] + "://" + HIDDEN
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide: as given (urlunsplit would normalize sqlite:////x)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (a log line, an error message) passed through ``redact_url``."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_value(value: Any) -> Any:
    """``value`` with every string in it, nested in dicts and lists too, passed through."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def with_git_token(url: str) -> str:
    """``url`` with the token of ``GRACE_GIT_TOKEN`` as its password, to connect with.

    Only an ``https://`` URL without userinfo of its own gets it; anything else (a local path,
    ssh, a URL that already names a user) is returned unchanged. The username is
    ``GRACE_GIT_USERNAME`` (default ``git``; GitLab wants ``oauth2``).

    Args:
        url: The data repository's URL as the user gave it (and as it is recorded).
    """
    token = os.environ.get(GIT_TOKEN_ENV, "")
    parts = urlsplit(url) if "://" in url else None
    if not token or parts is None or parts.scheme != "https" or "@" in parts.netloc:
        return url
    from urllib.parse import quote

    user = quote(os.environ.get(GIT_USER_ENV, "git"), safe="")
    netloc = f"{user}:{quote(token, safe='')}@{parts.netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
