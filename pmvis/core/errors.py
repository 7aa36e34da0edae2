"""The one exception type for bad user input: the CLI prints it without a traceback and exits 2."""


class PmvisError(Exception):
    """Bad input or configuration; the message says what is wrong and where (file, video, frame)."""
