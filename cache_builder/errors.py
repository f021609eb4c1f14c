"""User-facing build errors: the CLI prints the message on one line and exits with status 2."""


class BuildError(Exception):
    """Bad input to the builder (source, model, layer, output folder); the message says how to fix it."""
