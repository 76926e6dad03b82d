"""Keeping credentials out of everything gradtrack writes: files, warnings, messages.

The credentials a run may carry: the user and password in a tracking URI
(``https://user:password@host``), and the values of ``SECRET_VARIABLES`` in the environment. (A user
name alone, ``MLFLOW_TRACKING_USERNAME``, is no secret: MLflow itself records it as ``mlflow.user``.) Every text
gradtrack writes where a person or another program may read it (a spool line, ``rejected.jsonl``, a
warning, a message from the reporter) goes through ``redact`` first; a URI kept for later use goes
through ``strip_userinfo``, and the credentials come back from the environment or the command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "SECRET_VARIABLES", "redact", "strip_userinfo"]

MASK = "***"
SECRET_VARIABLES = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "WANDB_API_KEY",
    "DATABRICKS_TOKEN",
)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_MIN_SECRET = 4  # shorter values are too common to replace safely (and too short to be real secrets)


def strip_userinfo(uri: str) -> str:
    """The URI without ``user:password@``; unchanged when it has none or is not a URL."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _secrets(extra: Iterable[str]) -> list[str]:
    found = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    for uri in extra:
        userinfo = urlsplit(uri).netloc.rpartition("@")[0] if "@" in uri else ""
        found += [userinfo, *userinfo.split(":", 1)]
    # longest first, so a password is masked whole even where it contains another secret
    return sorted({value for value in found if len(value) >= _MIN_SECRET}, key=len, reverse=True)


def redact(text: str, uris: Iterable[str] = ()) -> str:
    """``text`` with every credential masked: userinfo in any URL, and every known secret value.

    ``uris``: tracking URIs whose userinfo may appear in ``text`` in other forms (quoted, encoded by
    an error message).
    """
    text = _USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    for secret in _secrets(uris):
        text = text.replace(secret, MASK)
    return text
