"""One module per backend, named after the artifact target it runs (plus ``eager``); each
registers its class with ``runtime.backend.register``."""
