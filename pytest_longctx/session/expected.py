"""A profile's expected failures as xfail markers, with the profile's reason.

Strict unless the entry says otherwise: a case the profile says fails but that
passes is reported as failed (XPASS(strict)), so a profile cannot keep excusing
a defect that was fixed and certificates stay honest. An entry with
``strict = false`` names a seed-dependent margin (xfailed or xpassed). Expected
failures belong to the claim, which the certificate shows, never to the backend
under test: a backend cannot excuse its own failures. An id that matches no collected test is warned
about (as array-api-tests does for its xfails file): it is a typo or a case
that no longer exists.
"""

from __future__ import annotations

import warnings
from typing import List

import pytest

from .options import profile_key


class LongctxProfileWarning(pytest.PytestWarning):
    """An expected-failure id of the profile matches no test."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Tryfirst: ids are matched before -k/-m deselect, so a deselected case is not called unknown."""
    profile = config.stash.get(profile_key, None)
    if profile is None or not profile.expected_failures:
        return
    used = set()
    for item in items:
        expected = profile.expected_failure(item.nodeid)
        if expected is not None:
            used.add(expected.id)
            item.add_marker(pytest.mark.xfail(reason=f"{expected.reason} (profile {profile.name})",
                                              strict=expected.strict))
    if hasattr(config, "workerinput") and config.workerinput.get("workerid") not in (None, "gw0"):
        return  # every worker collects the same tests: one warning is enough
    for expected in profile.expected_failures:
        if expected.id not in used:
            warnings.warn(LongctxProfileWarning(
                f"profile {profile.name}: expected-failure id={expected.id!r}, but should match a collected test"))
