"""The bundled pretrained model, loaded once per test session (about 30 s)."""

from __future__ import annotations

import pytest

from minicache_worker.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def lm() -> LoadedModel:
    return load_model("smollm2")
