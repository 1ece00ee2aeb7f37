"""The project's error types: each says what is wrong with an input and how to fix it."""


class EdgeLLMError(ValueError):
    """Bad input (a recipe, checkpoint, artifact or option); the message names the fix."""


class CheckpointError(EdgeLLMError):
    pass


class RecipeError(EdgeLLMError):
    pass
