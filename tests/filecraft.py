"""Crafting model files byte by byte: what a hostile or broken writer could produce."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A model file's header (parsed) and the tensor data after it."""
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(header: Any, data: bytes, text: str | None = None) -> bytes:
    """A file of ``header`` (or its JSON ``text`` as given) and ``data``, with a true length."""
    encoded = (json.dumps(header) if text is None else text).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data


def document_of(raw: bytes) -> dict[str, Any]:
    return json.loads(split(raw)[0]["__metadata__"]["document"])


def with_document(raw: bytes, change: Callable[[dict[str, Any]], Any] | None = None,
                  text: str | None = None) -> bytes:
    """The file with its document changed by ``change`` (or replaced by the JSON ``text``),
    and a checksum that matches again: only the document's own checks can refuse it."""
    header, data = split(raw)
    if text is None:
        document = document_of(raw)
        change(document)
        text = json.dumps(document)
    header["__metadata__"]["document"] = text
    header["__metadata__"]["checksum"] = hashlib.sha256(text.encode()).hexdigest()
    return join(header, data)


def nested(depth: int) -> str:
    """JSON text of lists nested ``depth`` deep."""
    return "[" * depth + "]" * depth
