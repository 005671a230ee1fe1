"""What a run certifies and how it is shown: the certificate document (``certificate``,
its ``schema/``), the plugin that writes it (``writer``), the question coverage, the
Markdown/HTML rendering and plots, merging certificates, and the context finder.

May import every layer below it: the contract, ``access``, the facade, ``measure``,
``session`` and ``isolation``.
"""
