"""Errors that carry a one-line, user-facing message."""


class DataError(ValueError):
    """Bad input data: the message names the file or folder and what was expected.

    Command-line tools print the message on one line and exit with status 2.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def first_line(error: BaseException) -> str:
    """The first non-empty line of `str(error)`, stripped; the class name if there is none.

    For folding another library's error (which may run to several lines) into a one-line
    message such as a `DataError`'s.
    """
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
