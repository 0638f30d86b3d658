"""One exception type for every bad input, so the CLI and the flows can report it in one line."""


class AbliterateError(Exception):
    """A problem with the user's input or environment.

    The message says what is wrong, where (file, tensor, layer) and what to do about it.
    """
