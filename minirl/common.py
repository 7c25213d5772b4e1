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


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    A crash inside the block leaves no folder at `out_dir` that looks complete; an
    existing `out_dir` is replaced only after the new one is fully written."""

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
        if os.path.exists(self.path):
            old = self.path + ".old-" + os.path.basename(self.tmp)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return False


def read_jsonl(path):
    """Yield (line_number, object) for each non-blank line; a bad line names file and line."""
    if not os.path.exists(path):
        raise MinirlError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise MinirlError(f"{path}:{i}: not valid JSON ({e.msg})") from None


# The bundled tiny model (README: "The bundled tiny model"), found from the package so the
# entry scripts' defaults work from any working directory.
BUNDLED_MODEL = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-arith"))
