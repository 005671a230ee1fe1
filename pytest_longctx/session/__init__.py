"""The pytest session: the pytest11 entry (``plugin``), options and settings, profiles,
fixtures and parametrization, the runtime fixtures, expected failures and the terminal
summary. What a run is asked and how its cases get a backend.

May import the contract, ``access``, the package facade and ``measure``.
"""
