"""The one exception type that the CLI turns into a single `sidetune: error: ...` line and a non-zero exit."""


class SidetuneError(Exception):
    """A problem with the user's input: its message names the problem and the fix, in one line."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """A library's error message squeezed onto one line (and cut at `limit` characters), to quote inside ours."""
    return " ".join(str(e).split())[:limit]
