"""TrainingError: a training run that cannot go on (a full disk, a folder in use, a non-finite loss, out of
memory, a damaged loss log); the message names the file and says what to change. helpers.train.run exports it."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the file (and line) and says what to change."""
