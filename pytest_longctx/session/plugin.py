"""The pytest11 entry point: the plugin modules, listed as pytest lists its own.

Each module is a plugin for one concern: options and settings, the fixtures
and matrix parametrization, the terminal summary, the profile's expected
failures, the certificate (JSON, Markdown, HTML), the deadline of a case,
the isolation of cases in child processes and the context finder.
"""

pytest_plugins = (
    "pytest_longctx.session.options",
    "pytest_longctx.session.fixtures",
    "pytest_longctx.session.runtime_fixtures",
    "pytest_longctx.session.terminal",
    "pytest_longctx.session.expected",
    "pytest_longctx.certify.writer",
    "pytest_longctx.isolation.deadline",
    "pytest_longctx.isolation.isolate",
    "pytest_longctx.certify.finder",
)
