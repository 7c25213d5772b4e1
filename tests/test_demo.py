"""The three out-of-the-box commands on the bundled tiny model, shortened (the full-length
figures come from benchmarks/bench_demo.py, not from a timed test)."""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_default_commands_shortened(tmp_path):
    # A fresh working directory: the defaults must find the bundled model by themselves.
    out = run("train_grpo.py", "--steps", 2, "--prompts-per-step", 4, "--eval-problems", 8,
              "--eval-samples", 2, cwd=tmp_path)
    assert "preset demo" in out and "step    2/2" in out
    assert "pass@1 before" in out  # the before/after table
    grpo_run = glob.glob(str(tmp_path / "runs" / "grpo-*"))[0]
    assert os.path.exists(os.path.join(grpo_run, "final", "model.safetensors"))
    assert len(open(os.path.join(grpo_run, "metrics.jsonl")).readlines()) >= 3

    out = run("train_sft.py", "--max-steps", 2, "--train-problems", 40, cwd=tmp_path)
    sft_run = glob.glob(str(tmp_path / "runs" / "sft-*"))[0]
    assert os.path.exists(os.path.join(sft_run, "final", "config.json"))
    assert json.load(open(os.path.join(sft_run, "args.json")))["lr"] == 2e-3  # the tiny model's rate

    out = run("evaluate.py", "--n", 4, "--num-problems", 8, cwd=tmp_path)
    report = json.load(open(glob.glob(str(tmp_path / "runs" / "eval-*" / "report" / "report.json"))[0]))
    assert [m["label"] for m in report["models"]] == ["base", "grpo", "sft"]
    assert report["comparisons"]
