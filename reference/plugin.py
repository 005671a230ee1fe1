"""The ``longctx_reference`` fixture, a pytest plugin of its own (entry point ``longctx_reference``).

The reference is the suite's yardstick, not the plugin's: the plugin never imports
it (the layering test holds that arrow), so a user's own test reaches it through
this fixture, which the package registers beside the plugin in ``pytest11``.
"""

from __future__ import annotations

from types import ModuleType

import pytest

from pytest_longctx import reference


@pytest.fixture(scope="session")
def longctx_reference() -> ModuleType:
    """The float64 reference: ``apply_rope``, ``attention``, ``attend``, ``roundtrip``, ``plain_attend``.

    Example::

        def test_decode(longctx_reference, longctx_spec):
            want = longctx_reference.attend(q, k, v, longctx_spec)
    """
    return reference
