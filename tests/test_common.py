"""minirl/common.py: random streams, dtype names, atomic files and folders, jsonl reading."""
import os
import stat

import pytest
import torch

from minirl.common import (AtomicDir, MinirlError, atomic_write_bytes, current_umask, make_generator, parse_dtype,
                           read_jsonl)


def draws(*args):
    return torch.rand(8, generator=make_generator(*args)).tolist()


def test_generator_depends_on_every_key_and_only_on_them():
    assert draws(3, "rollout", 1, 2) == draws(3, "rollout", 1, 2)
    base = draws(3, "rollout", 1, 2)
    for other in [(4, "rollout", 1, 2), (3, "other", 1, 2), (3, "rollout", 0, 2), (3, "rollout", 1, 3),
                  (3, "rollout", 1), (3, "rollout", 1, 2, 0)]:
        assert draws(*other) != base, other
    # No arithmetic seed formula: (step 1, round 64) and (step 2, round 0) are unrelated streams.
    assert draws(0, "rollout", 1, 64) != draws(0, "rollout", 2, 0)


def test_parse_dtype_names():
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    for name, dtype in table.items():
        assert parse_dtype(name) is dtype, name
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(MinirlError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one" and mode(path) == 0o666 & ~current_umask()
    os.chmod(path, 0o600)
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary file left behind


def test_atomic_dir_modes_replace_and_failure(tmp_path):
    out = tmp_path / "out"
    with AtomicDir(out) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        os.chmod(os.path.join(tmp, "sub"), 0o700)
        with open(os.path.join(tmp, "sub", "f.txt"), "w") as f:
            f.write("x")
        os.chmod(os.path.join(tmp, "sub", "f.txt"), 0o600)
    umask = current_umask()
    # The folder itself was made by mkdtemp (0700): it too gets the plain modes.
    assert mode(out) == 0o777 & ~umask and mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "sub" / "f.txt") == 0o666 & ~umask
    with AtomicDir(out) as tmp:  # an existing folder is replaced as a whole
        open(os.path.join(tmp, "g.txt"), "w").close()
    assert sorted(os.listdir(out)) == ["g.txt"]
    with pytest.raises(RuntimeError):
        with AtomicDir(tmp_path / "never") as tmp:
            open(os.path.join(tmp, "h.txt"), "w").close()
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_read_jsonl_blank_lines_line_numbers_and_torn_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"a": 2}\n{"a": 3')
    with pytest.raises(MinirlError, match=r"m.jsonl:5: not valid JSON"):
        list(read_jsonl(path))
    assert list(read_jsonl(path, torn_tail=True)) == [(1, {"a": 1}), (4, {"a": 2})]
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_bytes(b'{"a": 1}\nnot json\n{"a": 3}\n')  # a bad line before the last is always an error
    with pytest.raises(MinirlError, match=r"m.jsonl:2: not valid JSON"):
        list(read_jsonl(path, torn_tail=True))
    with pytest.raises(MinirlError, match="file not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
