"""The built-in backends, one module per backend family.

Installed as ``pytest_longctx.backends`` (``[tool.setuptools.package-dir]`` in
pyproject.toml maps this top-level folder there). A backend imports the contract
only (``pytest_longctx.spec``, ``.protocol``, ``.errors``, ``.rope``, ``.shapes``)
and its private helpers here (``_*.py``); never the plugin, the reference or the
suite. Each built-in is an entry point of the group ``pytest_longctx.backends``
(pyproject.toml), found as a third party's is, so nothing here is imported until
a backend is chosen; a class's ``device_aliases`` puts it on ``cpu``/``gpu``/``npu``.
"""
