"""The bytes of a model file: a safetensors container, read within bounds and written atomically.

Layout (the safetensors format, readable by any safetensors tool)::

    8 bytes    little-endian length N of the header
    N bytes    JSON header: for each tensor its dtype, shape and byte offsets in the data,
               and ``__metadata__``, an object of strings
    the rest   the tensors' raw little-endian bytes, end to end

Reading trusts nothing in the file. A file is recognized by this structure as a whole, never by
one byte; the header is read alone (capped) and checked entirely, and the declared shapes must
account for every byte of the data, before any tensor is allocated. So a file never makes a
reader allocate more than its own size, whatever it declares. Only a path to a regular file is
opened: a FIFO would block forever and ``/dev/zero`` never ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SerializationError

#: A larger header is not a model file, or a hostile one (safetensors' own limit).
HEADER_LIMIT = 100 * 2**20
#: Deepest nesting of JSON arrays and objects accepted; a model document needs about 10.
MAX_DEPTH = 64
#: safetensors dtype names <-> NumPy dtypes (little-endian, as the format stores them).
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
CODES = {np.dtype(v).name: k for k, v in DTYPES.items()}
_PICKLE_FRAME = 0x95  # pickle protocol 4+ starts "\x80 <protocol> FRAME <8-byte length>"


@dataclass
class Container:
    """What :func:`read` found: the ``__metadata__`` strings and the tensors by name."""

    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]


def read(path: str, check_metadata: Any = None) -> Container:
    """Read the safetensors container at ``path``, bounded by its size. ``check_metadata(metadata)``
    runs after the header is validated and before the tensor data is read: the caller refuses
    other formats there without reading them. Raises SerializationError saying what is wrong."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SerializationError(f"cannot read model file {path!r}: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SerializationError(f"{path!r} is {_kind(info.st_mode)}, not a model file: a model "
                                 f"file is a regular file")
    try:
        # O_NONBLOCK: should a FIFO replace the file after the check, opening it cannot hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise SerializationError(f"cannot read model file {path!r}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SerializationError(f"{path!r} is {_kind(info.st_mode)}, not a model file")
            return _read_open(path, f, info.st_size, check_metadata)
        except OSError as exc:
            raise SerializationError(f"cannot read model file {path!r}: {exc}") from None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _read_open(path: str, f: Any, size: int, check_metadata: Any) -> Container:
    start = f.read(16)
    if len(start) < 8:
        raise SerializationError(f"model file {path!r} is truncated or not a model file "
                                 f"({size} bytes)")
    length = int.from_bytes(start[:8], "little")
    if length > min(size - 8, HEADER_LIMIT) or start[8:9] != b"{":
        _refuse_other_formats(path, start, size)
        if length > HEADER_LIMIT or start[8:9] not in (b"{", b""):
            raise SerializationError(f"{path!r} is not a graphengine model file (it does not "
                                     f"start with a safetensors header)")
        raise SerializationError(
            f"model file {path!r} is truncated: its header claims {length} bytes, the file has "
            f"{size - 8} after the length field; restore it from a backup or save the model again")
    f.seek(8)
    raw = f.read(length)
    if len(raw) != length:
        raise SerializationError(f"model file {path!r} is truncated (it changed while read)")
    header = parse_json(raw, f"the header of model file {path!r}")
    metadata, entries = _check_header(path, header, size - 8 - length)
    if check_metadata is not None:
        check_metadata(metadata)
    tensors = {}
    base = 8 + length
    for name, (dtype, shape, begin, end) in entries.items():
        try:
            array = np.empty(shape, dtype)  # its size is part of the file's: checked above
        except ValueError as exc:  # dimensions NumPy cannot hold, even around a 0
            raise SerializationError(f"model file {path!r} is malformed: tensor {name!r} has "
                                     f"shape {list(shape)} ({exc})") from None
        f.seek(base + begin)
        if end > begin and f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
            raise SerializationError(f"model file {path!r} is truncated (it changed while read)")
        tensors[name] = array
    return Container(metadata, tensors)


def _refuse_other_formats(path: str, start: bytes, size: int) -> None:
    """Name a pickle or a zip only where the bytes say so for certain; they are never opened."""
    what = None
    if start[:4] == b"PK\x03\x04":
        what = "a zip archive (npz, or a torch file)"
    elif start[0] == 0x80 and start[1] in (2, 3) and start[2:3] in (b"c", b"}", b"]", b"(", b"\x8a"):
        what = "a pickle"
    elif start[0] == 0x80 and start[1] in (4, 5) and start[2] == _PICKLE_FRAME \
            and int.from_bytes(start[3:11], "little") <= size - 11:
        what = "a pickle"
    if what is not None:
        raise SerializationError(
            f"{path!r} is {what}, not a graphengine model file; graphengine never unpickles "
            f"(unpickling runs code from the file): load the arrays with their own tool "
            f"(np.load(..., allow_pickle=False)) and model.set_parameters(...)")


def parse_json(raw: bytes | str, what: str) -> Any:
    """JSON text as Python values, refusing nesting deeper than :data:`MAX_DEPTH` (which would
    exhaust the recursion of the parser or of whoever walks the result)."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise SerializationError(f"{what} is malformed: nested deeper than {MAX_DEPTH}") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise SerializationError(f"{what} is corrupted: not valid JSON ({exc})") from None
    if depth(value) > MAX_DEPTH:
        raise SerializationError(f"{what} is malformed: nested deeper than {MAX_DEPTH}")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value``, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:  # deeper is refused anyway: no need to walk it
            stack.extend((v, level + 1) for v in item)
    return deepest


def _check_header(path: str, header: Any, data_size: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """The header's metadata and, per tensor, (dtype, shape, begin, end), after checking that
    the tensors tile the data exactly."""
    where = f"model file {path!r}"
    if not isinstance(header, dict):
        raise SerializationError(f"{path!r} is not a graphengine model file (its header is a "
                                 f"JSON {type(header).__name__}, not an object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SerializationError(f"{where} is malformed: its __metadata__ is not an object of "
                                 f"strings")
    entries: dict[str, tuple] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and entry["dtype"] in DTYPES
                and _is_int_list(entry.get("shape")) and len(entry["shape"]) <= 32
                and _is_int_list(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
            raise SerializationError(f"{where} is malformed: tensor {name!r} has no valid dtype, "
                                     f"shape and data_offsets ({_short(entry)})")
        dtype = np.dtype(DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end or math.prod(shape) * dtype.itemsize != end - begin:
            raise SerializationError(f"{where} is corrupted: tensor {name!r} of shape "
                                     f"{list(shape)} ({entry['dtype']}) does not fit its "
                                     f"{end - begin} bytes")
        entries[name] = (dtype, shape, begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != position:
            raise SerializationError(f"{where} is corrupted: tensor {name!r} starts at byte "
                                     f"{begin} of the data, where {position} was expected")
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "corrupted"
        raise SerializationError(f"{where} is {state}: its tensors take {position} bytes, the "
                                 f"file holds {data_size} after its header; restore it from a "
                                 f"backup or save the model again")
    return metadata, entries


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        type(v) is int and 0 <= v < 2**62 for v in value)  # a bool is no size


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- writing

def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """The container's bytes, in parts (the tensors are not copied): tensors in name order,
    each aligned to 8 bytes by the header's padding, as safetensors writes them."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    arrays = []
    offset = 0
    # Widest items first: behind the header (padded to 8 bytes), every tensor is then aligned
    # to its item size, as safetensors lays them out.
    for name in sorted(tensors, key=lambda n: (-np.asarray(tensors[n]).dtype.itemsize, n)):
        array = np.asarray(tensors[name], order="C")  # not ascontiguousarray: it makes 0-d 1-d
        code = CODES.get(array.dtype.name)
        if code is None:
            raise SerializationError(f"tensor {name!r} has dtype {array.dtype}, which a model "
                                     f"file cannot hold; use one of {sorted(CODES)}")
        array = array.astype(DTYPES[code], copy=False)
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return [len(text).to_bytes(8, "little"), text,
            *(memoryview(a.reshape(-1).view(np.uint8)) for a in arrays if a.nbytes)]


def atomic_write(path: str | os.PathLike, parts: list[bytes | memoryview] | bytes) -> None:
    """Replace ``path`` by ``parts`` all at once: readers (and a crash) see the old file or the
    new one, never a mixture. The data go to a temporary file in the same directory, are flushed
    to the disk (fsync), then renamed over the file; the directory is fsynced so the rename lasts.

    Through a symbolic link, the link's target is replaced and the link kept. A path that is not
    a regular file (a directory, FIFO or device) or a read-only file is refused, not replaced.
    A new file gets the mode the umask allows (as ``open`` would make it); a replaced one keeps
    its mode."""
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise SerializationError(f"cannot write model file {path!r}: it is "
                                     f"{_kind(info.st_mode)}, which saving would replace; "
                                     f"choose a file name")
        if not info.st_mode & 0o222 or not os.access(target, os.W_OK):
            raise SerializationError(f"cannot write model file {path!r}: it is read-only; make "
                                     f"it writable (chmod u+w) or choose another name")
    directory = os.path.dirname(os.path.abspath(target))
    temporary = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    # 0o666 through the umask, as open() creates files; an existing file's mode is kept
    mode = 0o666 if info is None else stat.S_IMODE(info.st_mode)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in [parts] if isinstance(parts, bytes) else parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        if info is not None:
            os.chmod(temporary, mode)  # the umask may have masked bits the old file had
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # not every platform can open a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
