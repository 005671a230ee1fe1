"""The conformance suite users run: one module per question it certifies.

Installed as ``pytest_longctx.conformance`` (``[tool.setuptools.package-dir]`` in
pyproject.toml maps this top-level folder there). It imports the contract, the
reference and the plugin's fixture-facing modules, never a backend; the plugin
runs it by path and never imports it (tests/test_layering.py holds both arrows).

Failures are reported through one-line messages, never bare asserts, so the
suite needs no assertion rewriting: PYTEST_DONT_REWRITE. (That also keeps
pytester runs of the installed suite inside a process that imported it free
of "already imported" warnings.)
"""
