"""edgellm's shared core: what the exporter and the runtime both rely on.

Config, recipes, architectures, lazy weights, the one decoder, the one quantization, the one
tokenizer, the artifact contract and the packaged assets. It imports neither ``export`` nor
``runtime``; both depend on it and never on each other (``tests/test_layering.py`` keeps it so).
"""

from edgellm import env as _env

_env.apply_defaults()
