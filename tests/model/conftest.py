"""The model tier needs the training extra; without it, it skips locally and fails under CI."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import IN_CI

if importlib.util.find_spec("torch") is None:
    if IN_CI:
        raise RuntimeError(
            "CI=true but torch is missing: install the training extra (pip install -e '.[train]')"
        )
    pytest.skip("torch is not installed: pip install -e '.[train]'", allow_module_level=True)
