"""A small mutation check to run before (and after) a refactor of the GRPO or SFT path; not part of CI.

    python tests/mutate.py                 # every mutant
    python tests/mutate.py eps-high temp   # only the mutants whose name contains a word given

Each mutant is a planted bug: one exact text replacement in one file. For each, the tracked
files of the repository are copied to a temporary folder, the bug is planted there, and the
tests that cover that code run (pytest -x, so a caught mutant stops early). A mutant is
"caught" when a test fails, "survived" when all pass. A mutant whose text is no longer found
exactly once is reported as "stale": update it after moving the code it mutates.
The first three are the wiring bugs of issue 18, which once survived the whole suite.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WIRING = ["tests/test_wiring.py"]
SFT_WIRING = ["tests/test_sft_wiring.py"]
SFT_SUMMARY = ["tests/test_sft.py", "-k", "before_after"]
UNIT = ["tests/test_grpo.py", "-k", "not learns and not resume and not bad_input and not non_finite",
        "tests/test_losses.py"]

# (name, file, text, replacement, tests)
MUTANTS = [
    ("micro-batch-token-count", "train_grpo.py",
     "num_sequences=num_seq, num_tokens=num_tok,",
     "num_sequences=num_seq, num_tokens=sum(len(s.completion_ids) for s in mb if s.loss_mask),", WIRING),
    ("eps-high-is-eps-low", "train_grpo.py",
     "eps_high=args.eps_high,", "eps_high=args.eps_low,", WIRING),
    ("train-logprobs-temp-1", "train_grpo.py",
     "S.model, mb or chunk[:1], pad_id=S.tokenizer.pad_token_id, temperature=args.temperature,",
     "S.model, mb or chunk[:1], pad_id=S.tokenizer.pad_token_id, temperature=1.0,", WIRING),
    ("seq-mean-over-padded-length", "minirl/grpo.py",
     "lengths = mask.sum(1).clamp(min=1.0)  # [B]",
     "lengths = torch.full_like(mask.sum(1), mask.shape[1])  # [B]", WIRING + UNIT),
    ("biased-group-std", "minirl/grpo.py",
     "std = rewards.std(dim=1, keepdim=True)", "std = rewards.std(dim=1, keepdim=True, correction=0)",
     WIRING + UNIT),
    ("drop-last-micro-batch", "minirl/grpo.py",
     "    if current:\n        batches.append(current)\n    return batches",
     "    return batches", WIRING + UNIT),
    ("truncated-mask-ignored", "train_grpo.py",
     "loss_mask=not masked", "loss_mask=True", WIRING),
    ("mini-batch-split-drops-remainder", "train_grpo.py",
     "return [order[j * n // k:(j + 1) * n // k] for j in range(k)]",
     "return [order[j * (n // k):(j + 1) * (n // k)] for j in range(k)]", WIRING),
    ("zero-advantage-skip-with-kl", "train_grpo.py",
     'if args.beta == 0 and args.zero_advantage == "skip":', 'if args.zero_advantage == "skip":', WIRING),
    ("tis-uncapped", "minirl/grpo.py",
     "return rho.clamp(max=cap)", "return rho", WIRING),
    ("on-policy-when-either", "train_grpo.py",
     "on_policy = args.epochs_per_rollout == 1 and args.mini_batches == 1",
     "on_policy = args.epochs_per_rollout == 1 or args.mini_batches == 1", WIRING),
    ("kl-reference-is-policy", "minirl/grpo.py",
     "ref = pad_rows([s.ref_logprobs for s in samples], width, device) if beta > 0 else None",
     "ref = logp.detach() if beta > 0 else None", WIRING + UNIT),
    # SFT: each was planted by hand once and caught by the test named in its last field.
    ("sft-micro-batch-denominator", "train_sft.py",
     "loss = -logp.sum() * weight / n_targets", "loss = -logp.sum() * weight / max(logp.numel(), 1)", SFT_WIRING),
    ("sft-prompt-tokens-in-loss", "minirl/sft.py",
     "            m = np.asarray(s.mask[1:], dtype=bool)", "            m = np.ones(len(s.ids) - 1, dtype=bool)",
     SFT_WIRING),
    ("sft-warmup-lr-off-by-one", "train_sft.py", "        lr = lr_at(step, args.lr,", "        lr = lr_at(step + 1, args.lr,",
     SFT_WIRING),
    ("sft-grad-clip-dropped", "train_sft.py", "grad_norm_and_finite(model.parameters(), args.grad_clip)",
     "grad_norm_and_finite(model.parameters(), 0)", SFT_WIRING),
    ("sft-beta2-dropped", "train_sft.py", "betas=(args.adam_beta1, args.adam_beta2)", "betas=(args.adam_beta1, 0.95)",
     SFT_WIRING),
    ("sft-weight-decay-dropped", "train_sft.py", "weight_decay=args.weight_decay)", "weight_decay=0.0)", SFT_WIRING),
    ("sft-min-lr-ratio-dropped", "train_sft.py", "args.lr_schedule, args.min_lr_ratio)", "args.lr_schedule, 0.0)",
     SFT_WIRING),
    ("sft-samples-template-ignored", "train_sft.py", '            args.template = own or "raw"',
     '            args.template = "raw"', SFT_WIRING),
    ("sft-max-per-problem-highest-index", "minirl/sft.py", "chosen = sorted(per_problem[pid], key=lambda r: r[0])",
     "chosen = sorted(per_problem[pid], key=lambda r: -r[0])", SFT_WIRING),
    ("sft-init-std-ignored", "train_sft.py",
     'model.init_weights(args.init_std, generator=make_generator(args.seed, "init-weights"))\n        model.to(device=device,',
     'model.init_weights(0.02, generator=make_generator(args.seed, "init-weights"))\n        model.to(device=device,',
     SFT_WIRING),
    ("sft-heldout-sampling-temperature", "train_sft.py", "max_new_tokens=max_new, temperature=1.0,",
     "max_new_tokens=max_new, temperature=0.7,", SFT_SUMMARY),
    ("sft-heldout-before-not-resumed", "train_sft.py", '    before = extra.get("before")', "    before = None",
     SFT_SUMMARY),
]


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def run_mutant(name, path, text, replacement, tests, files):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    if source.count(text) != 1:
        return "stale", 0.0, f"text found {source.count(text)} times in {path}"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        for rel in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(tmp, rel))
        with open(os.path.join(tmp, path), "w", encoding="utf-8") as f:
            f.write(source.replace(text, replacement))
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tmp, env=env, capture_output=True, text=True)
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
        verdict = "caught" if proc.returncode != 0 else "survived"
        return verdict, time.time() - t0, (failed[0] if failed else proc.stdout.strip().splitlines()[-1])


def main():
    words = sys.argv[1:]
    files = tracked_files()
    chosen = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    results = []
    for m in chosen:
        verdict, seconds, detail = run_mutant(*m, files)
        results.append(verdict)
        print(f"{m[0]:<30} {verdict:<9} {seconds:6.0f}s  {detail}", flush=True)
    print(f"{results.count('caught')} caught, {results.count('survived')} survived, "
          f"{results.count('stale')} stale, of {len(results)}")
    sys.exit(0 if results.count("caught") == len(results) else 1)


if __name__ == "__main__":
    main()
