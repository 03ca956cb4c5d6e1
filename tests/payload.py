"""A pickle that runs code when loaded: what a model file must never be able to do."""

from __future__ import annotations


class Payload:
    """Unpickling this creates the file ``marker``: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
