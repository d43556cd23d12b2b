"""The one exception type users see.

Anything the user can fix (a bad recipe name, a missing data folder, a malformed TSV row, a wrong
override) raises `SelectuneError` with a one-line message that names the problem and the fix. The
CLI prints it without a traceback (unless `debug=true` or SELECTUNE_DEBUG=1) and exits non-zero.
"""


class SelectuneError(Exception):
    """A user-facing error: the message alone must be enough to fix the problem."""

    exit_code = 2
