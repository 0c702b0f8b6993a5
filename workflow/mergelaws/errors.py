"""Errors that name the file at fault and the fix; importable without torch."""


class ModelError(ValueError):
    """A model directory problem, naming the directory and the fix."""
