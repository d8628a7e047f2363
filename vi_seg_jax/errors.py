"""Errors that carry a one-line, user-facing message."""


class DataError(ValueError):
    """Bad input data: the message names the file or folder and what was expected.

    Command-line tools print the message on one line and exit with status 2.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
