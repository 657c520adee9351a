"""The error a user's mistake raises anywhere in dsnet, library or command line."""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, with exit status 2, never as a traceback."""
