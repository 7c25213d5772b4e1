"""Benchmark: `report` (minirl.report.build_report) on 500 problems x 256 samples, two models.

    python benchmarks/bench_report.py [--problems 500] [--n 256] [--keep DIR]

Writes a synthetic pair of samples files (a "base" and an "rl" model, responses of a few
hundred characters drawn from a small reasoning vocabulary, the rl model using fewer
reflection words), then times build_report on them: reading and validating both files,
pass@k / maj@k / bootstrap intervals, bins, transitions, entropy, lengths, phrase and
word counts, report.json / report.md and the figures. Prints the seconds and the device.
The target (issue 8) is under 30 s on a CPU. Generation time is not counted.

In the same run it times the report a second time with --answer-grouping string (the
string grouping of maj@k / answer entropy that canonical grouping replaced) and prints the
ratio; with --tokenizer DIR the token-level frequencies are counted with that tokenizer
(e.g. SmolLM2's), otherwise they are skipped (the synthetic files name no model folder).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minirl.report import build_report  # noqa: E402

FILLER = ("the of to and a is we so that this number x equals sum first second answer value then "
          "compute gives find term solve equation both sides divide multiply which each total "
          "problem step result integer factor prime square root now can be by for with in on as "
          "from are it if not where let since because therefore but however thus need get").split()
KEYWORDS = ("wait", "hmm", "maybe", "perhaps", "actually", "verify", "alternatively", "let me think",
            "let's check", "make sure", "ok", "double-check")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_synthetic_pair(out_dir, num_problems=500, n=256, seed=0):
    """Two samples files over the same problems; returns their paths."""
    rng = np.random.default_rng(seed)
    # Base success probability per problem: a tenth never solved, the rest spread out.
    q_base = np.where(rng.random(num_problems) < 0.1, 0.0, rng.beta(0.7, 0.7, num_problems))
    logit = np.log(np.clip(q_base, 1e-6, 1 - 1e-6) / np.clip(1 - q_base, 1e-6, 1))
    # The "rl" model sharpens: easier problems gain, a few rarely solved ones are lost.
    q_rl = np.where(q_base == 0, 0.0, 1 / (1 + np.exp(-(logit + 1.0))))
    q_rl = np.where((q_base > 0) & (q_base < 0.02) & (rng.random(num_problems) < 0.3), 0.0, q_rl)
    paths = []
    for name, q, kw_rate in (("base", q_base, 0.06), ("rl", q_rl, 0.02)):
        vocab = FILLER + list(KEYWORDS)
        weights = np.concatenate([1 / np.arange(1, len(FILLER) + 1), np.full(len(KEYWORDS), 1.0)])
        weights[len(FILLER):] *= kw_rate * weights[:len(FILLER)].sum() / (1 - kw_rate) / len(KEYWORDS)
        weights /= weights.sum()
        total = num_problems * n
        lengths = rng.integers(40, 100, total)                      # words per response
        words = np.array(vocab, dtype=object)[rng.choice(len(vocab), size=lengths.sum(), p=weights)]
        ends = np.cumsum(lengths)
        correct = rng.random((num_problems, n)) < q[:, None]
        wrong = rng.zipf(1.6, (num_problems, n)) % 40                # a few popular wrong answers
        no_answer = rng.random((num_problems, n)) < 0.03
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for p in range(num_problems):
                gold = str(1000 + p)
                for j in range(n):
                    r = p * n + j
                    text = " ".join(words[ends[r] - lengths[r]:ends[r]])
                    ok = bool(correct[p, j])
                    answer = gold if ok else (None if no_answer[p, j] else str(int(wrong[p, j])))
                    if answer is not None:
                        text += f" so the answer is \\boxed{{{answer}}}."
                    f.write(json.dumps({
                        "problem_id": f"p{p}", "difficulty": int(p % 5) + 1, "gold": gold, "sample_index": j,
                        "response": text, "num_tokens": len(text) // 4,
                        "finish_reason": "length" if answer is None else "stop",
                        "answer": answer, "correct": ok}) + "\n")
        with open(os.path.join(out_dir, f"{name}.settings.json"), "w") as f:
            json.dump({"model": f"synthetic/{name}", "n": n}, f)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--keep", help="write the samples and the report here instead of a temporary folder")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the token-level frequencies")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        os.makedirs(root, exist_ok=True)
        t0 = time.perf_counter()
        files = write_synthetic_pair(root, args.problems, args.n)
        gen = time.perf_counter() - t0
        mb = sum(os.path.getsize(f) for f in files) / 2**20
        t0, c0 = time.perf_counter(), time.process_time()
        report = build_report(files, os.path.join(root, "report"), plots=not args.no_plots, tokenizer=args.tokenizer)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        c1 = time.process_time()
        build_report(files, os.path.join(root, "report-string"), plots=not args.no_plots, tokenizer=args.tokenizer,
                     answer_grouping="string")
        cpu_string = time.process_time() - c1
    base, rl = report["models"]
    print(f"device: CPU {_cpu_name()} ({os.cpu_count()} cores), python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"data: 2 files x {args.problems} problems x {args.n} samples ({mb:.0f} MiB, generated in {gen:.1f} s)")
    print(f"report: accuracy {100 * base['accuracy']['mean']:.1f} -> {100 * rl['accuracy']['mean']:.1f}, "
          f"pass@{args.n} {100 * base['pass_at_k'][str(args.n)]['mean']:.1f} -> "
          f"{100 * rl['pass_at_k'][str(args.n)]['mean']:.1f}, figures {len(report['figures'])}")
    # CPU time is the honest figure on a shared machine: wall time also counts waiting
    # for cores that other processes hold (load average shown for that reason).
    tokens = "counted with " + args.tokenizer if args.tokenizer else "skipped (no --tokenizer)"
    print(f"build_report: {secs:.1f} s wall, {cpu:.1f} s CPU (target < 30 s); token frequencies {tokens}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"answer grouping: canonical {cpu:.1f} s CPU vs string {cpu_string:.1f} s CPU "
          f"(ratio {cpu / max(cpu_string, 1e-9):.2f})")


if __name__ == "__main__":
    main()
