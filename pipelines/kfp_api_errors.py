"""kfp.Client's failures as one GraceError line that names the KFP host.

Left alone, an HTTP error from the API server is a multi-line ``ApiException`` (headers and
all), an unreachable host is urllib3's ``MaxRetryError``, and a failing health probe is a bare
``TimeoutError`` after five retries: tracebacks, from the CLI, that do not say which server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from grace.errors import GraceError

MAX_MESSAGE = 500


@contextmanager
def kfp_api_errors(host: str) -> Iterator[None]:
    """Run kfp.Client calls; their transport and HTTP errors become GraceError naming ``host``."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as e:
        if not e.status:  # raised before any answer (TLS failure)
            raise GraceError(f"cannot reach the KFP API at {host}: {e.reason}") from e
        said = server_message(e.body)
        raise GraceError(
            f"the KFP API at {host} refused: HTTP {e.status} {e.reason}{': ' if said else ''}{said}"
        ) from e
    except urllib3.exceptions.HTTPError as e:  # connection refused, DNS, timeouts
        cause = getattr(e, "reason", None) or e
        raise GraceError(f"cannot reach the KFP API at {host}: {cause}") from e
    except TimeoutError as e:  # kfp.Client's health probe gave up
        raise GraceError(f"the KFP API at {host} is not healthy: {e}") from e


def server_message(body: bytes | str | None) -> str:
    """The ``message`` of a KFP error body (``{"code": 3, "message": ...}``), else its text."""
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("message"):
        text = str(parsed["message"])
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."
