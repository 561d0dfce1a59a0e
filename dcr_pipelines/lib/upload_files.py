"""Reading an upload safely: what kind of file it is, decompression, text decoding, line endings, limits.

Nothing here follows a symbolic link, opens a special file, or trusts a file
name: :func:`inspect_entry` looks at an entry without opening it, and
:func:`open_upload` opens regular files only (``O_NOFOLLOW``). CSV and JSON
Lines uploads may be gzip or zstd compressed (recognised by their first bytes,
whatever the name says). Text is decoded with the dataset's declared
encoding; a UTF-8 byte-order mark is dropped; CRLF, CR and mixed line endings
become LF (a carriage return inside a quoted field becomes a newline too).
A line longer than :data:`MAX_LINE_CHARS` is refused, naming the line.

Every problem raises :class:`FileProblem` with one sentence naming the file,
the line where there is one, and the fix.
"""

from __future__ import annotations

import codecs
import gzip
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
MAX_LINE_CHARS = 1 << 20  # 1 Mi characters per physical line; a header or a row longer than that is not a table export
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SUFFIXES = {
    "csv": (".csv", ".csv.gz", ".csv.zst", ".tsv", ".txt"),
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst"),
}


class FileProblem(Exception):
    """The file cannot be read as an upload of its dataset (the message says why and what to do)."""


def accepted_suffix(name: str, fmt: str) -> bool:
    return name.lower().endswith(SUFFIXES[fmt])


def inspect_entry(path: Path) -> str | None:
    """Why the directory entry ``path`` cannot be an upload (without following or opening it), or None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "the file disappeared before it was read"
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link: uploads must be regular files, links are never followed (copy the file itself)"
    if stat.S_ISDIR(info.st_mode):
        return "a directory: put each file directly in the dataset's landing folder"
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or special file"
        return f"{kind}: uploads must be regular files"
    if info.st_size == 0:
        return "the file is empty (0 bytes); a header row and at least one data row are required"
    return None


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (a link is refused, never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FileProblem(f"{path.name}: cannot be opened ({exc.strerror}); uploads must be readable regular files") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileProblem(f"{path.name}: not a regular file; uploads must be regular files")
    return os.fdopen(fd, "rb")


def compression(path: Path) -> str | None:
    with open_regular(path) as handle:
        head = handle.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def open_upload(path: Path) -> BinaryIO:
    """The upload's bytes, decompressed if it is gzip or zstd."""
    raw = open_regular(path)
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _read(handle: BinaryIO, name: str) -> bytes:
    try:
        return handle.read(CHUNK)
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise FileProblem(f"{name}: the compressed stream is damaged or truncated ({exc}); send the export again") from None
    except Exception as exc:
        if type(exc).__module__.startswith("zstandard"):
            raise FileProblem(f"{name}: the zstd stream is damaged or truncated ({exc}); send the export again") from None
        raise


def _encoding_hint(encoding: str) -> str:
    if codecs.lookup(encoding).name == "utf-8":
        return "; if the file is Latin-1 or Windows-1252, declare it in the dataset's policy: format: {encoding: latin-1} (or cp1252)"
    return f"; check the dataset's format.encoding ({encoding})"


def text_lines_blocks(path: Path, encoding: str, label: str | None = None) -> Iterator[str]:
    """The upload as text in blocks that end on a line boundary, LF line endings, BOM dropped, lines bounded.

    Raises :class:`FileProblem` naming the file (``label``, the name its party gave it) and the line for bad
    bytes or an overlong line.
    """
    name = label or path.name
    codec = codecs.lookup(encoding)
    decoder = codecs.getincrementaldecoder("utf-8-sig" if codec.name == "utf-8" else codec.name)()
    line = 1  # the line number of the first character of ``pending``
    pending = ""  # the last, unfinished line: emitted once its newline arrives
    carriage = ""  # a trailing CR held back in case the next block starts with LF
    with open_upload(path) as handle:
        while True:
            block = _read(handle, name)
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                good = exc.object[: exc.start].decode(codec.name, errors="replace") if exc.start else ""
                where = line + _newlines(pending + carriage + good).count("\n")
                bad = exc.object[exc.start : exc.start + 1].hex()
                raise FileProblem(f"{name}: line {where} is not valid {encoding} text (byte 0x{bad}){_encoding_hint(encoding)}") from None
            text = carriage + text
            carriage = ""
            if not final and text.endswith("\r"):
                text, carriage = text[:-1], "\r"
            data = pending + _newlines(text)
            cut = len(data) if final else data.rfind("\n") + 1
            emitted, pending = data[:cut], data[cut:]
            segments = emitted.split("\n")
            if segments[-1] == "":
                segments.pop()  # the emitted text ends on a line boundary: no partial segment
            lengths = [len(s) for s in segments] + [len(pending)]
            if max(lengths) > MAX_LINE_CHARS:
                offending = line + next(i for i, n in enumerate(lengths) if n > MAX_LINE_CHARS)
                raise FileProblem(
                    f"{name}: line {offending} is longer than {MAX_LINE_CHARS:,} characters; is this a table export? "
                    "(a header or a row that long is refused)"
                )
            line += emitted.count("\n")
            if emitted:
                yield emitted
            if final:
                return


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")
