"""benchmarks/gpu_check.py without a GPU: the command itself (every stage skipped, exit 0,
summary and Markdown written, twice in a row), the stage runner's isolation (a stage that
fails, crashes or hangs is reported and the next one runs), and stage bodies run on the CPU
with tiny model bodies (--device cpu, MINIRL_GPU_CHECK_TINY: the 151,936-token vocabulary
kept, two small layers)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402


def run(*flags, env=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, SCRIPT, *map(str, flags)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_stage_is_skipped_and_it_exits_0_twice(tmp_path):
    for _ in range(2):  # safe to run twice in a row
        proc = run("--out", tmp_path / "out", "--cache", tmp_path / "cache", timeout=120)
        assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [r["check"] for r in data["rows"]] == [c for _, c, _ in gpu_check.STAGES]
    assert all(r["result"] == "skipped: no CUDA" for r in data["rows"])
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.count("| skipped: no CUDA |") == len(gpu_check.STAGES)
    assert "Device: CPU" in md and "commit " in md and "`python benchmarks/gpu_check.py" in md
    n = len(gpu_check.STAGES)
    assert f"{n}/{n} checks passed or skipped" in proc.stdout


def test_run_stage_reports_each_outcome(tmp_path):
    py = sys.executable
    ok = [py, "-c", 'import json; print("noise"); print(json.dumps({"result": "pass", "figure": "3.2 s"}))']
    said_fail = [py, "-c", 'import json; print(json.dumps({"result": "FAIL: losses", "figure": "nan"}))']
    crash = [py, "-c", 'import sys; print("partial"); sys.stderr.write("RuntimeError: CUDA out of memory\\n"); sys.exit(3)']
    hang = [py, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    plain = [py, "-c", "print('7 passed in 2.1s')"]
    log = str(tmp_path / "logs" / "x.log")
    assert gpu_check.run_stage(ok, 30, log) == ("pass", "3.2 s")
    assert gpu_check.run_stage(said_fail, 30, log) == ("FAIL: losses", "nan")
    assert gpu_check.run_stage(crash, 30, log) == ("FAIL: exit 3", "RuntimeError: CUDA out of memory")
    result, figure = gpu_check.run_stage(hang, 2, log)
    assert (result, figure) == ("FAIL: timeout after 2 s", "started")
    assert "started" in open(log).read()  # the log keeps what the stage printed before the kill
    assert gpu_check.run_stage(plain, 30, log) == ("pass", "7 passed in 2.1s")


def test_a_failing_stage_does_not_stop_the_others(tmp_path, monkeypatch):
    """run_all with stages whose children fail, crash and pass: every stage gets a row, in
    order, and the summary names the failures."""
    calls = []

    def fake_run_stage(cmd, timeout, log_path):
        name = cmd[cmd.index("--stage") + 1]
        calls.append((name, timeout))
        return {"a": ("FAIL: exit 1", "boom"), "b": ("FAIL: timeout after 5 s", ""),
                "c": ("pass", "1.0 s")}[name]
    monkeypatch.setattr(gpu_check, "run_stage", fake_run_stage)
    args = gpu_check.argparse.Namespace(only=None, budget=100, out=str(tmp_path), cache=str(tmp_path),
                                        decode_tokens=8, smollm2=None)
    stages = [("a", "check a", 50), ("b", "check b", 50), ("c", "check c", 50)]
    rows, _ = gpu_check.run_all(args, cuda=True, stages=stages)
    assert [r["check"] for r in rows] == ["check a", "check b", "check c"]
    assert [n for n, _ in calls] == ["a", "b", "c"]
    assert all(t <= 50 for _, t in calls)
    assert gpu_check.failed(rows) == ["check a", "check b"]
    # Out of budget: later stages are skipped, and say why.
    args.budget = 10
    rows, _ = gpu_check.run_all(args, cuda=True, stages=stages)
    assert all(r["result"] == "skipped: time budget used up" for r in rows)


def test_summary_table_and_markdown():
    rows = [gpu_check.result_row("decode | SmolLM2", "pass", "16/16 rows identical"),
            gpu_check.result_row("bench", "FAIL: exit 1", "line\nbreak")]
    table = gpu_check.summary_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "figure"]
    assert lines[2].startswith("decode | SmolLM2") and "16/16 rows identical" in lines[2]
    assert len(lines) == 4 and lines[3].endswith("line break")
    assert lines[2].index("pass") == lines[3].index("FAIL")  # columns aligned
    meta = dict(date="2026-01-01 00:00 UTC", device="NVIDIA H200", torch="2.13", commit="abc1234",
                command="python benchmarks/gpu_check.py", seconds=401.0)
    md = gpu_check.markdown(rows, meta)
    assert "| check | result | figure |" in md
    assert "| decode \\| SmolLM2 | pass | 16/16 rows identical |" in md  # | escaped for Markdown
    assert "| bench | FAIL: exit 1 | line break |" in md
    assert "NVIDIA H200" in md and "abc1234" in md and "401 s" in md


@pytest.mark.parametrize("stage", ["grpo-qwen0.5b", "decode-qwen1.5b"])
def test_stage_bodies_run_on_cpu_with_tiny_models(tmp_path, stage):
    """The stage code itself (random model build with the synthetic 151,936-token tokenizer,
    train_grpo.py in bf16, checkpoint reload and master check; graph-path vs eager decode
    with the near-tie rule) on the CPU, so a GPU run starts from code that has run."""
    flags = ["--stage", stage, "--device", "cpu", "--out", tmp_path / "out", "--cache", tmp_path / "cache",
             "--decode-tokens", 12]
    proc = run(*flags, env={"MINIRL_GPU_CHECK_TINY": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["result"] == "pass", result
    if stage.startswith("grpo"):
        assert "checkpoint reloaded" in result["figure"]
        assert os.listdir(tmp_path / "cache") == ["qwen2.5-0.5b-tiny-random-std0.02-bf16"]
    else:
        assert "rows identical" in result["figure"]
