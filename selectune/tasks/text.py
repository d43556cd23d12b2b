"""Reading the text files a user hands selectune (GLUE TSVs, VTAB-1k lists) without trusting them.

A file with bytes that are not UTF-8 fails with one line naming the file, the line and the byte,
rather than a UnicodeDecodeError traceback; an error that quotes a row quotes at most a short excerpt,
so one bad multi-megabyte line cannot flood the terminal.
"""

from __future__ import annotations

from pathlib import Path

from selectune.errors import SelectuneError

EXCERPT = 200  # characters of a row an error message quotes at most


def read_utf8(path: Path) -> str:
    """The file's text (a leading byte-order mark dropped, line ends kept as they are)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # the codec counts after the mark
        lineno = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise SelectuneError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[offset]:02x} at column {column}); "
                             f"save the file as UTF-8") from None


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """`text` quoted for an error message: at most `limit` characters, the cut marked."""
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "…")
