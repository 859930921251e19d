"""The one error type input processing raises for bad user input.

Anything that is the caller's fault (undecodable image, disallowed URL, malformed
messages, image/placeholder count mismatch...) raises `InvalidInputError`, so the
API server can answer it with a 4xx and carry on. Other exceptions are our bugs.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
    """The request's input is invalid; the message says why and is safe to show the client."""
