"""The one exception type that means "the user can fix this": the CLI prints it as one line, exit 2."""

import difflib


class UserError(Exception):
    """A problem in the user's input (recipe, file, adapter); the message names it and the fix."""


def did_you_mean(word: str, choices, n: int = 3) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
