"""The built-in backends, one module per backend family.

Installed as ``pytest_longctx.backends`` (``[tool.setuptools.package-dir]`` in
pyproject.toml maps this top-level folder there). A backend imports the contract
only (``pytest_longctx.spec``, ``.protocol``, ``.errors``, ``.rope``, ``.shapes``)
and its private helpers here (``_*.py``); never the plugin, the reference or the
suite. The plugin finds built-ins by ``module:factory`` text in
``pytest_longctx.access.registry.BUILTINS``, as it finds a third party's entry point, so
nothing here is imported until a backend is chosen.
"""
