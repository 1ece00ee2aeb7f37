"""The project's error types: each says what is wrong with an input and how to fix it."""


class EdgeLLMError(ValueError):
    """Bad input (a recipe, checkpoint, artifact or option); the message names the fix."""


class CheckpointError(EdgeLLMError):
    """A checkpoint (HF folder, GGUF) that cannot be read or does not match its config."""


class RecipeError(EdgeLLMError):
    """A recipe with an unknown, missing or out-of-range field."""
