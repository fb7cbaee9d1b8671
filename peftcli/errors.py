"""The one exception type that means "the user can fix this": the CLI prints it as one line, exit 2."""

import difflib


class UserError(Exception):
    """A problem in the user's input (recipe, file, adapter); the message names it and the fix."""


def did_you_mean(word: str, choices, n: int = 3) -> str:
    choices = [str(c) for c in choices]
    same_but_case = [c for c in choices if c.lower() == str(word).lower() and c != str(word)]
    close = same_but_case or difflib.get_close_matches(str(word), choices, n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def one_line(text, limit: int = 200) -> str:
    """A user-supplied fragment (a key, a value, a parser's message) made safe for a one-line error:
    newlines and other control characters escaped, long text cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."
