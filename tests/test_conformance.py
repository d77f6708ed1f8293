"""The shipped conformance suite, run against every registered backend."""

from __future__ import annotations

import pytest
from rdmamig.plugins import load_registry
from rdmamig.testing.conformance import BackendConformance


@pytest.fixture(params=sorted(load_registry().backends))
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestBackendConformance(BackendConformance):
    pass
