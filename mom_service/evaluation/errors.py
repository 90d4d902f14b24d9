"""The evaluation's one error: what the user asked cannot be run."""


class EvalError(Exception):
    """What the user asked cannot be run (a dataset, a target, an option): one clear message, exit 1."""
