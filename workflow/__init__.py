"""mergelaws: measure and predict how language-model merging scales.

The package lives in ``workflow/`` and is imported as ``mergelaws`` (the name
``workflow`` is a reserved global inside Snakefiles).
"""

__version__ = "0.1.0"
