"""The project's error types for problems the user can fix, which ``ascl`` reports in one line.

Anything else that is raised is a bug, and the command line shows its traceback.  They
derive from the built-in types a caller would expect (``ValueError``, ``FileExistsError``,
``FileNotFoundError``), so catching those still works from Python.
"""


class InputError(ValueError):
    """A flag, config, file or dataset that cannot be used; the message says which, what was
    expected and what was received."""


class OutputExists(InputError, FileExistsError):
    """An output that is there already and would be replaced; the message says how to
    proceed."""


class MissingInput(InputError, FileNotFoundError):
    """An input (a run, a checkpoint, a file) that does not exist."""
