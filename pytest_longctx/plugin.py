"""The pytest11 entry point: lists the plugin modules, as pytest lists its own."""
