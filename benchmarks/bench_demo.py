"""The out-of-the-box story at full length, timed: `python train_grpo.py`, `python
train_sft.py` and `python evaluate.py` with no arguments, run one after the other in a
fresh folder (so the runs are these ones), on whatever device is there.

    python benchmarks/bench_demo.py [--workdir DIR]

Prints each command's wall time, GRPO's before/after held-out table (from summary.json)
and the report's accuracy / pass@k per model and per level — the bundled base model is the
reference every run is compared with. Record the output in BENCHMARKS.md.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, cwd):
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script)], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.time() - t0, proc.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="default: a new temporary folder")
    args = p.parse_args()
    import torch
    work = args.workdir or tempfile.mkdtemp(prefix="minirl-demo-")
    os.makedirs(work, exist_ok=True)
    sys.path.insert(0, ROOT)
    from minirl.common import device_description
    print(f"device: {device_description()} | torch {torch.__version__} | workdir {work}")
    for script in ("train_grpo.py", "train_sft.py", "evaluate.py"):
        seconds, out = run(script, work)
        print(f"\n== python {script}: {seconds / 60:.1f} min")
        if script == "train_grpo.py":
            print(out[out.index("held-out pass@1"):].strip())
        if script == "train_sft.py":
            print(out[out.index("held-out, before -> after SFT"):].strip())
        if script == "evaluate.py":
            print("\n".join(ln for ln in out.splitlines() if "accuracy" in ln))
    report_dir = sorted(glob.glob(os.path.join(work, "runs", "eval-*", "report")))[-1]
    print(f"report: {report_dir}")
    with open(os.path.join(report_dir, "report.json")) as f:
        report = json.load(f)
    print("\nper level: success rate (pass@1) / solved at least once (pass@n), %")
    for m in report["models"]:
        cells = [f"L{row['group']} {100 * row['success_rate']:.1f}/{100 * row['solved_fraction']:.1f}"
                 for row in m["by_level"] or []]
        print(f"  {m['label']:>5}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
