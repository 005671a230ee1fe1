"""A backend module whose import fails, as a vendor module does when its shared library is missing."""

raise ImportError("librkllmrt.so: cannot open shared object file: No such file or directory")
