"""The one exception type that the CLI turns into a single `sidetune: error: ...` line and a non-zero exit."""


class SidetuneError(Exception):
    """A problem with the user's input: its message names the problem and the fix, in one line."""
