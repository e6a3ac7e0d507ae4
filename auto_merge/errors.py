"""The base of every error meant for the user: the CLI prints it as one line (or one block), without a traceback.

`key_path`, when set, locates the problem in the input the user wrote (a config key, a recipe field), so callers
never need to parse another part's message text.
"""

from __future__ import annotations


class AutoMergeError(Exception):
    """A problem with the user's input, files or environment, explained in the message with the fix."""

    key_path: tuple = ()
