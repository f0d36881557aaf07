"""Secrets stay out of MLflow and the console: params, tags, text artifacts and printed URIs.

A value is hidden when its key looks like a secret (the idea of Spark's
``spark.redaction.regex``: ``secret``, ``password``, ``token``, ``access key``...), and credentials
inside a URI (``user:pass@`` or a ``?secret_key=...`` query, as ``pyarrow.fs`` URIs may carry) are
hidden in any text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "*********(redacted)"
SECRET_KEY = re.compile(
    r"(?i)secret|passw|pwd|token(?!i[sz])|credential|(?:access|account|private|api)[._-]?key"
    r"|(?:^|[._-])(?:sig|sas)(?:$|[._-])"
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
_QUERY_PARAM = re.compile(r"(?P<key>[A-Za-z0-9_.-]+)=(?P<value>[^&;\s#\"',]+)")


def redact_text(text: str) -> str:
    """``text`` with URI credentials replaced."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['key']}={REDACTED}" if SECRET_KEY.search(m["key"]) else m[0], text
    )


def redact_value(key: str, value: Any) -> str:
    return REDACTED if SECRET_KEY.search(key) else redact_text(str(value))


def redact_mapping(values: Mapping[str, Any]) -> dict[str, str]:
    """Flat ``{key: value}`` (MLflow params, tags) with secret values hidden."""
    return {k: redact_value(k, v) for k, v in values.items()}


def redact_tree(value: Any, key: str = "") -> Any:
    """A nested dict/list (a config dump) with secret values hidden."""
    if isinstance(value, Mapping):
        return {k: redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v, key) for v in value]
    if isinstance(value, str):
        return redact_value(key, value)
    return REDACTED if key and SECRET_KEY.search(key) and value is not None else value
