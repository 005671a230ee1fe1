"""The conformance suite users run: one module per question it certifies.

Failures are reported through one-line messages, never bare asserts, so the
suite needs no assertion rewriting: PYTEST_DONT_REWRITE. (That also keeps
pytester runs of the installed suite inside a process that imported it free
of "already imported" warnings.)
"""
