"""evaluate.py end to end on a tiny model: sample -> report, resume after an interruption,
banned words, and the errors a user can cause."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(*args, check=True, cwd=ROOT):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def sample_flags(model, out, **over):
    flags = {"--model": model, "--task": "arithmetic", "--task-levels": "1,2", "--num-problems": 6,
             "--n": 4, "--max-new-tokens": 12, "--template": "raw", "--chunk-problems": 2, "--seed": 5,
             "--out": out}
    flags.update(over)
    return ["sample"] + [x for kv in flags.items() for x in kv]


def test_sample_then_report(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_eval(*sample_flags(tiny_model_dir, a, **{"--label": "base"}))
    run_eval(*sample_flags(tiny_model_dir, b, **{"--label": "other", "--seed": 6}))
    lines = [json.loads(ln) for ln in open(a)]
    assert len(lines) == 24
    assert {"problem_id", "difficulty", "gold", "response", "num_tokens", "finish_reason", "answer",
            "correct", "sample_index"} <= set(lines[0])
    settings = json.load(open(tmp_path / "a.settings.json"))
    assert settings["n"] == 4 and settings["label"] == "base"
    proc = run_eval("report", a, b, "--out", tmp_path / "rep", "--bootstrap", 20)
    assert "base: accuracy" in proc.stdout and "other: accuracy" in proc.stdout
    report = json.load(open(tmp_path / "rep" / "report.json"))
    assert [m["label"] for m in report["models"]] == ["base", "other"]
    assert os.path.exists(tmp_path / "rep" / "report.md")


def test_interrupted_sample_resumes_to_the_same_file(tiny_model_dir, tmp_path):
    full = tmp_path / "full.jsonl"
    run_eval(*sample_flags(tiny_model_dir, full))
    lines = open(full).read().splitlines(keepends=True)
    # An interruption after two whole chunks (2 problems x 4 samples each) and part of a third.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:16 + 3]))
    shutil.copy(tmp_path / "full.settings.json", tmp_path / "cut.settings.json")
    proc = run_eval(*sample_flags(tiny_model_dir, cut))
    assert "resuming" in proc.stdout and "4/6 problems already sampled" in proc.stdout
    assert open(cut).read() == open(full).read()


def test_banned_words_never_appear(tiny_model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    run_eval(*sample_flags(tiny_model_dir, out, **{"--banned-words": "a,B,7", "--max-new-tokens": 30}))
    for ln in open(out):  # whole words, any case ("17" and "ab" are other words)
        text = json.loads(ln)["response"]
        assert not re.search(r"\b(a|b|7)\b", text, re.IGNORECASE), text


def test_changed_settings_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    run_eval(*sample_flags(tiny_model_dir, out))
    proc = run_eval(*sample_flags(tiny_model_dir, out, **{"--n": 8}), check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_report_mismatched_files(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_eval(*sample_flags(tiny_model_dir, a))
    run_eval(*sample_flags(tiny_model_dir, b, **{"--n": 2}))
    proc = run_eval("report", a, b, "--out", tmp_path / "rep", check=False)
    assert proc.returncode == 2
    assert "a.jsonl" in proc.stderr and "b.jsonl" in proc.stderr
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    proc = run_eval("report", tmp_path / "bad.jsonl", check=False)
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr


def test_missing_model(tmp_path):
    proc = run_eval(*sample_flags(tmp_path / "nope", tmp_path / "s.jsonl"), check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_synthetic_problem_ids_encode_task_levels_and_seed():
    from minirl.tasks import make_problems
    low = make_problems("arithmetic", 20, seed=7, levels=[1, 2])
    high = make_problems("arithmetic", 20, seed=7, levels=[4, 5])
    assert low[0].id == "arithmetic-L12-s7-0"
    assert not {p.id for p in low} & {p.id for p in high}
    assert not {p.id for p in low} & {p.id for p in make_problems("arithmetic", 20, seed=7, levels=[2, 1])}
    assert not {p.id for p in low} & {p.id for p in make_problems("countdown", 20, seed=7, levels=[1, 2])}
    assert [p.id for p in make_problems("arithmetic", 5, seed=7, levels=[1, 2])] == [p.id for p in low[:5]]


def test_report_input_errors_one_line(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"problem_id": f"arithmetic-L1-s0-{p}", "difficulty": 1, "gold": str(p),
                                     "question": f"{p}+0=?", "sample_index": j, "response": f"\\boxed{{{j}}}",
                                     "num_tokens": 9, "finish_reason": "stop", "answer": str(j),
                                     "correct": j == p}) + "\n" for p in range(3) for j in range(2)))
    proc = run_eval("report", a, "--ks", "1,x", "--out", tmp_path / "rep", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --ks: expected comma-separated whole numbers such as 1,8,64, got '1,x'"]
    # The same problem ids holding other problems (a hand-edited gold answer): refused, naming an id.
    rows = [json.loads(ln) for ln in open(a)]
    first = rows[0]["problem_id"]
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(dict(r, gold="99999") if r["problem_id"] == first else r) + "\n" for r in rows))
    proc = run_eval("report", a, b, "--out", tmp_path / "rep", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"give problem {first!r} different problems" in proc.stderr
    assert not os.path.exists(tmp_path / "rep")
    # An --out that cannot be written: one line naming the flag, before any work.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for cmd in (["report", a, "--out", blocker / "rep"], ["--out", blocker / "eval"]):
        proc = run_eval(*cmd, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: --out {blocker / cmd[-1].name}: cannot write there (Not a directory)"], proc.stderr
