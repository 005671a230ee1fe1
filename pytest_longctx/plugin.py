"""The pytest11 entry point: the plugin modules, listed as pytest lists its own.

Each module is a plugin for one concern: options and settings, the fixtures
and matrix parametrization, the terminal summary, the profile's expected
failures, the certificate (JSON, Markdown, HTML), the deadline of a case,
the isolation of cases in child processes and the context finder.
"""

pytest_plugins = (
    "pytest_longctx.options",
    "pytest_longctx.fixtures",
    "pytest_longctx.runtime_fixtures",
    "pytest_longctx.summary",
    "pytest_longctx.expected",
    "pytest_longctx.report",
    "pytest_longctx.deadline",
    "pytest_longctx.isolate",
    "pytest_longctx.finder",
)
