"""Things every part of minirl shares: the user-error type, device and dtype choice,
atomic file writes, and seeding. Dtypes and devices are decided here and nowhere else."""
import json
import os
import platform
import random
import shutil
import tempfile

import numpy as np
import torch


class MinirlError(ValueError):
    """An error the user caused (bad path, file, field or flag). The message names the
    file, line, key or flag; entry scripts print it as one line and exit with status 2."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 weights on GPU, fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_description(device=None) -> str:
    """The GPU's name, or the CPU's model with its core and torch-thread counts: what a
    benchmark or run log should say it ran on."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def parse_dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise MinirlError(f"unknown dtype {name!r}; choose one of {sorted(table)}")
    return table[name]


def make_generator(seed: int, purpose: str, *keys: int, device="cpu") -> torch.Generator:
    """The one rule for every random stream in minirl: a torch.Generator seeded from
    (seed, purpose, *keys) through a hash, e.g. make_generator(seed, "rollout", step, round).

    Streams with different purposes or keys are unrelated (no arithmetic seed formulas that
    collide, such as step * 64 + round once round >= 64), and a stream depends only on its
    own keys: a resumed run, or a run split over more processes, draws the same numbers."""
    import hashlib
    text = repr((int(seed), str(purpose)) + tuple(int(k) for k in keys)).encode()
    value = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % (2**63)
    g = torch.Generator(device=device)
    g.manual_seed(value)
    return g


class TrainingDiverged(Exception):
    """Too many non-finite updates in a row: not a user error (exit status 1, one line)."""


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- files
# Temporary files and folders are created private (mkstemp 0600, mkdtemp 0700). What a run
# leaves behind must be readable as if written with plain open() / os.makedirs: the mode is
# set from the umask (0644 / 0755 under the usual umask 022), so a colleague on a shared
# cluster can load the model.


def current_umask() -> int:
    """The process umask (Linux: read from /proc, so no other thread ever sees it changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool) -> int:
    """The permission bits open() (0666) or os.makedirs() (0777) would give under the umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def settle_tree(folder):
    """Before a built folder is renamed into place: give every file and folder in it the
    umask's mode (some writers, safetensors among them, create files 0600), and flush it
    all to the disk, so that the rename never exposes names whose contents a power cut
    could still lose."""
    file_mode, dir_mode = plain_mode(is_dir=False), plain_mode(is_dir=True)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, dir_mode)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, file_mode)
            fsync_path(path)
    fsync_path(folder)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    The file gets the mode of the file it replaces, or the umask's mode for a new one."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else plain_mode(is_dir=False)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class AtomicDir:
    """Build a folder under a temporary name and rename it into place on success.

        with AtomicDir(out_dir) as tmp:
            ...write files into tmp...
    A crash inside the block leaves no folder at `out_dir` that looks complete, only a
    `.tmp-*` folder beside it; an existing `out_dir` is replaced only after the new one is
    fully written and flushed to the disk. Everything in it gets the umask's modes (0755 for
    folders, 0644 for files under umask 022), whatever mode the writers created."""

    def __init__(self, path):
        self.path = os.path.abspath(str(path))

    def __enter__(self):
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(self.path) + "-")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        settle_tree(self.tmp)
        if os.path.exists(self.path):
            old = self.tmp + ".old"  # still a .tmp-* name: a crash here leaves only a leftover
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        fsync_path(os.path.dirname(self.path))  # the rename itself
        return False


def read_jsonl(path, torn_tail: bool = False):
    """Yield (line_number, object) for each non-blank line; a bad line names file and line.

    torn_tail=True is for files a process appends to (metrics.jsonl, samples files): a kill
    or power cut during the last append leaves a last line cut short (or NUL bytes). That
    line is skipped instead of refused; a bad line anywhere before it is still an error."""
    if not os.path.exists(path):
        raise MinirlError(f"{path}: file not found")
    with open(path, "rb") as f:
        pending = None  # the latest non-blank line, parsed once we know it is not the last
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if pending is not None:
                yield pending[0], _parse_json_line(path, *pending)
            pending = (i, line)
        if pending is not None:
            try:
                obj = _parse_json_line(path, *pending)
            except MinirlError:
                if not torn_tail:
                    raise
            else:
                yield pending[0], obj


def _parse_json_line(path, lineno: int, line: bytes):
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise MinirlError(f"{path}:{lineno}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MinirlError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def check_writable_dir(path, flag: str, shown=None):
    """Refuse, before any work, an output folder that cannot be created or written, naming
    the flag. os.access is not enough (root is "allowed" everything, even in /proc), so
    this tries: a probe file in an existing folder, or the folder itself (removed again)."""
    shown = shown or path
    path = os.path.abspath(str(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise MinirlError(f"{flag} {shown}: exists and is not a folder")
    created = []
    try:
        if os.path.isdir(path):
            fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
            os.close(fd)
            os.remove(probe)
        else:
            missing = path
            while not os.path.exists(missing):
                created.append(missing)
                missing = os.path.dirname(missing)
            os.makedirs(path)
    except OSError as e:
        raise MinirlError(f"{flag} {shown}: cannot write there ({e.strerror or e})") from None
    finally:
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass


def check_writable_file(path, flag: str):
    """check_writable_dir for an output file: its folder, and the file itself if it exists."""
    if os.path.isdir(path):
        raise MinirlError(f"{flag} {path}: is a folder, expected a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(str(path))), flag, shown=path)
    if os.path.exists(path):
        try:
            open(path, "ab").close()
        except OSError as e:
            raise MinirlError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


# The bundled tiny model (README: "The bundled tiny model"), found from the package so the
# entry scripts' defaults work from any working directory.
BUNDLED_MODEL = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-arith"))
