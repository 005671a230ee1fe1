"""The one guarded way to reach a backend: find it (``registry``: entry points,
``module:factory`` text, aliases), call it (``guard``: one failure line, run control
re-raised) and tell run control from a vendor's error (``runcontrol``).

May import the contract only (the flat modules of ``pytest_longctx``).
"""
