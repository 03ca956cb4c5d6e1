"""Shared fixtures: every array test runs on every backend that can run here."""

from __future__ import annotations

import pytest

import graphengine as ge

BACKENDS = ["numpy", "strict", "cupy"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """A backend name; CuPy is skipped with the reason it is unavailable."""
    cls = ge.get_plugin_manager().backends.get(request.param)
    reason = cls.unavailable_reason()
    if reason:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param
