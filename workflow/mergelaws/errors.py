"""Every error mergelaws raises on bad input: one line naming the file or key at fault and the
fix. The CLI (mergelaws.cli) catches :class:`MergelawsError` once, prints that line and exits 2;
anything else is a bug and keeps its traceback. Importable without torch."""


class MergelawsError(ValueError):
    """Bad input, named with its fix. Subclasses say which kind."""


class ConfigError(MergelawsError):
    """A config file or key problem, naming the key and what is allowed."""


class DataError(MergelawsError):
    """A data file problem, naming the file (and line) and the fix."""


class ModelError(MergelawsError):
    """A model directory problem, naming the directory and the fix."""


class CheckpointError(ModelError):
    """A safetensors checkpoint that cannot be read as the merge needs it."""


class MethodError(ConfigError):
    """An unknown merge method or a bad method parameter."""


class TableError(MergelawsError):
    """A losses or fits table (parquet, CSV, JSON) that is missing, not a file, corrupt or lacks
    the columns a command needs."""


def one_line(text: object, limit: int = 400) -> str:
    """The first non-empty line of an error's text, shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"
