"""How a case is kept from taking the run down: the deadline of a case (a hang becomes
a failure), cases in a child process (``isolate``) and the fork plumbing (``forked``).

May import the contract, ``access``, the facade, ``measure`` and ``session``.
"""
