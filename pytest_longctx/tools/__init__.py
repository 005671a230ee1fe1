"""The console scripts: ``longctx-bench`` (``bench``), ``longctx-report`` (``report``),
``longctx-logits`` (``logits``) and ``longctx-tiny-gguf`` (``tinygguf``). Commands only:
what they compute lives in the layers below.

May import any layer of the package and the reference; nothing imports a tool.
"""
