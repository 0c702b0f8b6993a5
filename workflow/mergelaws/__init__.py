"""mergelaws: measure and predict how language-model merging scales.

The package lives in ``workflow/mergelaws/``: an import name is its path
(``mergelaws.sweep`` is ``workflow/mergelaws/sweep.py``).
"""

__version__ = "0.1.0"
