"""Reading the text files a user hands selectune (GLUE TSVs, VTAB-1k lists) without trusting them.

A file with bytes that are not UTF-8 fails with one line naming the file, the line and the byte,
rather than a UnicodeDecodeError traceback; an error that quotes a row quotes at most a short excerpt,
so one bad multi-megabyte line cannot flood the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def jsonl_objects(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file. Lines end at "\\n" only: a JSON string
    may hold U+2028, at which str.splitlines would cut it. A line that is not JSON, or is JSON but not an
    object, fails naming file and line; `expected` says what the object should hold."""
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SelectuneError(f"{path}:{lineno}: malformed line: not JSON ({err.msg}): {excerpt(line)}") from None
        if not isinstance(row, dict):
            raise SelectuneError(f"{path}:{lineno}: malformed line: expected an object with {expected}, found "
                                 f"{type(row).__name__}: {excerpt(line)}")
        yield lineno, row
