"""Reading and writing files safely.

Writes never leave a half-written file: the bytes go to a temporary name in the same folder, are
flushed and fsynced, then renamed over the target (an atomic step on POSIX and Windows), and the
folder is fsynced so the rename itself survives a crash. A rename replaces whatever has the name, so a
writer refuses a target that exists and is not a regular file (a device such as /dev/null, a FIFO, a
folder) or is a symbolic link (the rename would replace the link, not write where it points).

Reads accept regular files only (a FIFO would block forever, a link to /dev/zero would read until
memory runs out), up to a size limit stated in the error, and turn every way a file can be bad
(missing, too large, truncated, not safetensors, not JSON, a pickle) into a `CheckpointError` naming
the file. No pickle is ever loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError

SAFETENSORS_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
# mkstemp creates files readable by the owner only; a saved model should get the permissions any
# other new file gets. The umask can only be read by setting it, so read it once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
MAX_JSON_BYTES = 64 << 20  # a config or a state file; the largest tinypeft writes is well under 1 MiB
MAX_TENSOR_FILE_BYTES = 16 << 30  # gpt2-xl in float32 is 6.4 GB


def check_write_target(path: str | os.PathLike) -> None:
    """Raise ConfigError if `path` exists and is not a regular file, or is a symbolic link."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"{path} is a symbolic link (to {os.readlink(path)}); tinypeft writes a file by atomically replacing "
            "it, which would replace the link: give the path of the file itself"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"{path} exists and is {_kind(st.st_mode)}, not a regular file; tinypeft writes a file by atomically "
            "replacing it, which would replace that: give the path of a file"
        )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str, limit: int) -> int:
    """The size of `path`, a regular file (links followed) of at most `limit` bytes, else a CheckpointError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a folder; expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is {_kind(st.st_mode)}, not a regular file; tinypeft reads regular files only")
    if st.st_size > limit:
        raise CheckpointError(f"{path} is {st.st_size:,d} bytes; files of this kind are read up to {limit:,d} bytes")
    return st.st_size


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = os.fspath(path)
    check_write_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX only; Windows files have no mode bits to fix
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str | os.PathLike) -> Any:
    data = _read(path, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers longer than Python's
    # int-to-str digit limit; RecursionError comes from very deep nesting
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{os.fspath(path)} is not valid JSON: {e}") from None


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Save host copies of the tensors; metadata {"format": "pt"} lets transformers and PEFT read the file."""
    from safetensors.numpy import save

    from ..backend import to_numpy

    arrays = {name: np.ascontiguousarray(to_numpy(t)) for name, t in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata={"format": "pt", **(metadata or {})}))


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, or a CheckpointError saying why the file is unreadable."""
    from safetensors.numpy import load

    data = _read(path, MAX_TENSOR_FILE_BYTES)
    # a header of 640, 896, 1152 or 1408 bytes starts the file with a pickle's magic bytes too: a JSON
    # header's "{" after the 8-byte length says safetensors
    safetensors_header = len(data) > 8 and data[8:9] == b"{"
    pickle_magic = data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    if (pickle_magic and not safetensors_header) or data[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{os.fspath(path)} is a pickle or a torch .bin/.pt archive; tinypeft never loads pickles "
            "(they can run code). Convert it to safetensors first."
        )
    if len(data) < 8:
        raise CheckpointError(f"{os.fspath(path)} is truncated: {len(data)} bytes, a safetensors file has >= 8")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise CheckpointError(
            f"{os.fspath(path)} is truncated or not safetensors: its header claims {header_len} bytes "
            f"but only {len(data) - 8} follow"
        )
    data_len = _described_data_length(data[8 : 8 + header_len])
    if data_len is not None and 8 + header_len + data_len > len(data):
        raise CheckpointError(
            f"{os.fspath(path)} is truncated: its header describes {data_len} bytes of tensors "
            f"but only {len(data) - 8 - header_len} follow"
        )
    try:
        tensors = load(data)
    except KeyError as e:  # safetensors.numpy has no NumPy dtype for this tensor (bfloat16, float8, ...)
        raise CheckpointError(
            f"{os.fspath(path)} holds a tensor of dtype {e.args[0]}, which NumPy cannot represent; "
            f"tinypeft reads {list(SAFETENSORS_DTYPES)}"
        ) from None
    except Exception as e:  # safetensors raises its own error types, and others on odd headers
        raise CheckpointError(f"{os.fspath(path)} is not a valid safetensors file: {e}") from None
    return dict(tensors)


def _described_data_length(header: bytes) -> int | None:
    """The tensor bytes a safetensors header describes (the largest end offset), or None if the
    header is not readable that way (safetensors' own parser then says what is wrong)."""
    try:
        entries = json.loads(header)
        return max(
            (int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"),
            default=0,
        )
    except Exception:  # anything unexpected in a corrupt header: leave the verdict to safetensors
        return None


def read_file(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> bytes:
    """A regular file's bytes, up to `limit`, or a CheckpointError naming the file."""
    return _read(path, limit)


def _read(path: str | os.PathLike, limit: int) -> bytes:
    path = os.fspath(path)
    size = check_regular_file(path, limit)
    try:
        with open(path, "rb") as f:
            # bounded even if the file grew since it was checked; read(n) reserves n bytes at once, so n is
            # the file's size, not the limit (16 GiB reserved per read failed under an address-space limit)
            data = f.read(min(size, limit) + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if len(data) > limit:
        raise CheckpointError(f"{path} is over {limit:,d} bytes; files of this kind are read up to {limit:,d} bytes")
    return data
