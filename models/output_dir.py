"""Atomic writes: a file through a temporary sibling renamed over it (write_file_atomic), and a command's output
directory as a whole: checked before any work, built in a temporary sibling, swapped into place only when complete.

Everything written gets the permissions an ordinary open() or mkdir() gives (0666 / 0777 less the process umask,
0644 / 0755 with the usual 022), as PEFT's and transformers' files have: safetensors' save_file and tempfile's
mkstemp / mkdtemp create 0600 / 0700, which other users and containers cannot read.

The rule (merge, convert-gguf and the built-in model's conversion share it): the output path may not exist yet or
be an empty directory; a non-empty one is replaced only when asked (`overwrite`, the commands' --overwrite) and
only if it holds a checkpoint (config.json), so a mistyped path never deletes unrelated files. It may not be or
contain one of the command's inputs. Because the new directory replaces the old one whole, no file of an earlier
output (a chat template, a shard index) survives into the new one, and a failure leaves the old one untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


def write_file_atomic(file: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp) on a temporary sibling of `file`, fsync it, give it the ordinary mode (0666 less the umask,
    whatever `write` created it with), and rename it over `file`; the temporary is removed on failure.

    The temporary `.<name>.<pid>.<random>.tmp` lives in the target's directory (os.replace is atomic only within
    one filesystem) and is unique per process and call.
    """
    file = os.fspath(file)
    directory, name = os.path.split(file)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        # Created 0666 by us, the kernel applies the umask: that is the mode to keep (reading the umask would mean
        # setting it, which races with other threads); `write` may replace the file (safetensors writes 0600).
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, file)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(file: str | os.PathLike, text: str) -> None:
    """write_file_atomic of a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_file_atomic(file, write)


def make_hidden_dir(parent: str, name: str) -> str:
    """Create and return a new directory `<parent>/.<name>.tmp-<random>` with the ordinary mode (not
    tempfile.mkdtemp: its 0700 would become the mode of what the directory is renamed to)."""
    path = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
    os.mkdir(path)
    return path


def check_output_dir(path: str | os.PathLike, flag: str, *, overwrite: bool = False,
                     inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> str:  # fmt: skip
    """Raise ValueError unless `path` may be written as a whole (see the module docstring); returns its real path.

    flag: how the path is named in errors ("--out"). inputs: (flag, path) pairs the output must not be or contain.
    """
    path = os.fspath(path)
    real = os.path.realpath(path)
    for input_flag, input_path in inputs:
        if input_path is None:
            continue
        input_real = os.path.realpath(input_path)
        if _inside(input_real, real):
            where = "is" if input_real == real else "contains"
            raise ValueError(f"{flag}={path!r} {where} {input_flag}={os.fspath(input_path)!r}: writing it would "
                             f"replace its input; choose another {flag}")  # fmt: skip
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path!r} exists and is not a directory; an output directory is needed")
    try:
        entries = os.listdir(real) if os.path.isdir(real) else []
    except OSError as e:
        raise ValueError(f"{flag}={path!r} cannot be read ({e.strerror})") from None
    if entries:
        if not overwrite:
            raise ValueError(f"{flag}={path!r} is not empty; choose a new or empty directory, or allow replacing a "
                             "checkpoint directory (one with config.json) as a whole (--overwrite, overwrite=True)")  # fmt: skip
        if "config.json" not in entries:
            raise ValueError(f"{flag}={path!r} holds files but no config.json, so it is not a checkpoint that "
                             "--overwrite may replace; choose a new or empty directory")  # fmt: skip
    return real


@contextmanager
def atomic_output_dir(path: str | os.PathLike, flag: str, *, overwrite: bool = False,
                      inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> Iterator[str]:  # fmt: skip
    """Check `path` (check_output_dir), yield a fresh temporary sibling directory to write the output into, and
    swap it into place when the block completes; on any error it is removed and `path` is left as it was.

    OSErrors of the output (the parent not writable, a full disk) are raised as ValueError naming `flag`.
    """
    path = os.fspath(path)
    real = check_output_dir(path, flag, overwrite=overwrite, inputs=inputs)
    parent, name = os.path.split(real)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = make_hidden_dir(parent, name)
    except OSError as e:
        raise ValueError(f"{flag}={path!r}: cannot create a directory in {parent!r} ({e.strerror})") from None
    try:
        yield tmp
        _swap(tmp, real)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is not None and any(_inside(os.path.realpath(os.fspath(e.filename)), d) for d in (tmp, real)):
            raise ValueError(f"{flag}={path!r}: writing the output failed ({e.strerror}); nothing was changed "
                             "there") from None  # fmt: skip
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: str, real: str) -> None:
    """Put the complete directory `tmp` at `real`; a previous non-empty `real` is moved aside first and deleted
    only once the new one is in place (rename(2) replaces an empty directory, not a full one)."""
    if os.path.isdir(real) and os.listdir(real):
        old = f"{tmp}.old"
        os.rename(real, old)
        try:
            os.rename(tmp, real)
        except OSError:
            os.rename(old, real)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, real)


def _inside(path: str, directory: str) -> bool:
    """`path` is `directory` or lies below it (both real paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
