"""A mutation check to run before (and after) a refactor; a tool, not part of CI.

    python tests/mutate.py                       # every mutant of every module
    python tests/mutate.py --module metrics      # one module's mutants (repeat --module for more)
    python tests/mutate.py eps-high temp         # only the mutants whose name contains a word given
    python tests/mutate.py --check               # only check that every mutant's text is still there
    python tests/mutate.py --list                # the modules and how many mutants each has

Each mutant is a planted bug: one exact text replacement in one file. For each, the tracked
files of the repository are copied to a temporary folder, the bug is planted there, and the
tests a developer would run after editing that module run (pytest -x, so a caught mutant
stops at the first failing test). A mutant is "caught" when a test fails, "SURVIVED" when all
pass. A mutant whose text is no longer found exactly once is "stale" and fails the script:
update its text after moving the code it mutates. The working tree is never touched.

Mutants are listed per module below (WIRING is the GRPO/SFT wiring of the entry scripts).
A sibling file tests/mutants_<module>.py adds a module: it defines MUTANTS, a list of the same
(name, file, text, replacement, tests) tuples, and optionally EQUIVALENT. EQUIVALENT holds
mutants that change nothing a user can observe, each with the reason; they are reported (and
checked for staleness) but not run. The script prints a Markdown table (mutant, module,
verdict: the test id that caught it / equivalent / SURVIVED) and the total time, and exits
non-zero when any mutant survived or is stale.
The first three WIRING mutants are the wiring bugs of issue 18, which once survived the whole suite.
"""
import argparse
import concurrent.futures
import glob
import importlib.util
import os
import re
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

# ------------------------------------------------------------------ per-module mutants
# Each list: the bugs a refactor of that module makes (a boundary moved, an off-by-one, a
# swapped argument, a flag not passed on, a wrong denominator, a state not reset, a transposed
# index, a default changed), run against the tests of that module.

METRICS_TESTS = ["tests/test_metrics.py", "tests/test_metrics_properties.py"]
METRICS = [
    ("pass-at-k-denominator-off-by-one", "minirl/metrics.py",
     "i = np.arange(n, 0, -1, dtype=np.float64)", "i = np.arange(n + 1, 1, -1, dtype=np.float64)", METRICS_TESTS),
    ("default-ks-drops-n-for-one", "minirl/metrics.py",
     "if (1 << i) <= n]", "if (1 << i) < n]", METRICS_TESTS),
    ("maj-tie-not-shared", "minirl/metrics.py",
     "return (tied & good).sum(-1) / np.maximum(tied.sum(-1), 1)", "return (tied & good).any(-1).astype(float)",
     METRICS_TESTS),
    ("maj-at-1-over-answered-only", "minirl/metrics.py",
     "return (counts * good).sum(1) / n", "return (counts * good).sum(1) / np.maximum(n - classes.none, 1)",
     METRICS_TESTS),
    ("maj-all-correct-ignores-no-answer", "minirl/metrics.py",
     "out[easy] = pass_at_k(n, n - classes.none[easy], k)", "out[easy] = 1.0", METRICS_TESTS),
    ("class-correct-needs-majority", "minirl/metrics.py",
     "class_correct = (counts > 0) & (2 * good >= counts)", "class_correct = (counts > 0) & (2 * good > counts)",
     METRICS_TESTS),
    ("entropy-default-excludes-none", "minirl/metrics.py",
     "def answer_entropy(classes: AnswerClasses, include_none: bool = True):",
     "def answer_entropy(classes: AnswerClasses, include_none: bool = False):", METRICS_TESTS),
    ("bootstrap-one-sided-alpha", "minirl/metrics.py",
     "        alpha = (1.0 - confidence) / 2\n        low, high = np.quantile(",
     "        alpha = 1.0 - confidence\n        low, high = np.quantile(", METRICS_TESTS),
    ("ratio-bootstrap-seed-ignored", "minirl/metrics.py",
     "        P = num.size\n        rng = np.random.default_rng(seed)",
     "        P = num.size\n        rng = np.random.default_rng(0)", METRICS_TESTS),
    ("bins-floor-instead-of-ceil", "minirl/metrics.py",
     "u = min(n, max(1, math.ceil(e * n / edges_n)))", "u = min(n, max(1, math.floor(e * n / edges_n)))",
     METRICS_TESTS),
    ("assign-bins-right-side", "minirl/metrics.py",
     'return np.searchsorted(uppers, counts, side="left")', 'return np.searchsorted(uppers, counts, side="right")',
     METRICS_TESTS),
    ("transition-fractions-by-column", "minirl/metrics.py",
     "rows = counts.sum(1, keepdims=True)", "rows = counts.sum(0, keepdims=True)", METRICS_TESTS),
    ("response-means-incorrect-unweighted", "minirl/metrics.py",
     '"incorrect": group_mean(values, g, num_groups, weights=~correct)[0]}',
     '"incorrect": group_mean(values, g, num_groups)[0]}', METRICS_TESTS),
    ("log-ratio-smoothing-without-vocab", "minirl/metrics.py",
     "ratio = np.log((c_o + alpha) / (N_o + alpha * V)) - np.log((c_r + alpha) / (N_r + alpha * V))",
     "ratio = np.log((c_o + alpha) / (N_o + alpha)) - np.log((c_r + alpha) / (N_r + alpha))", METRICS_TESTS),
]

REPORT_TESTS = ["tests/test_report.py", "tests/test_report_figures.py"]
REPORT = [
    ("report-solved-fraction-boundary", "minirl/report.py",
     "solved, _ = metrics.group_mean(m.counts > 0, groups, G)", "solved, _ = metrics.group_mean(m.counts >= 0, groups, G)",
     REPORT_TESTS),
    ("report-words-per-problem", "minirl/report.py",
     '"words_per_response": total_words / num_responses', '"words_per_response": total_words / s.num_problems',
     REPORT_TESTS),
    ("report-other-bins-from-reference", "minirl/report.py",
     "other_bin = metrics.assign_bins(other.counts, bins)", "other_bin = metrics.assign_bins(ref.counts, bins)",
     REPORT_TESTS),
    ("report-only-sets-swapped", "minirl/report.py",
     '"only_reference": int((r_any & ~o_any).sum())', '"only_reference": int((~r_any & o_any).sum())', REPORT_TESTS),
    ("figure-pass-curve-draws-upper-bound", "minirl/report.py",
     'mean = [100 * (r["mean"] or 0) for r in rows]', 'mean = [100 * (r["ci_high"] or 0) for r in rows]',
     REPORT_TESTS),
    ("figure-lengths-draw-all-responses", "minirl/report.py",
     "vals = [row[measure][kind] or 0 for row in m[\"by_bin\"]]", "vals = [row[measure][\"all\"] or 0 for row in m[\"by_bin\"]]",
     REPORT_TESTS),
    ("figure-categories-one-model-offset", "minirl/report.py",
     "ax.bar(xc + (i - (len(models) - 1) / 2) * width, [m[\"categories\"][c][\"per_1k_words\"] for c in cats],",
     "ax.bar(xc + (i - (len(models) - 1) / 2) * width, [models[0][\"categories\"][c][\"per_1k_words\"] for c in cats],",
     REPORT_TESTS),
    ("figure-behaviour-error-bar-upper-from-low", "minirl/report.py",
     '[100 * ((v.get("ci_high") or 0) - (v.get("mean") or 0)) for v in sh]',
     '[100 * ((v.get("mean") or 0) - (v.get("ci_low") or 0)) for v in sh]', REPORT_TESTS),
    ("figure-bin-change-draws-other-success", "minirl/report.py",
     'change = [100 * (r["change"] or 0) for r in c["bins"]]', 'change = [100 * (r["other_success"] or 0) for r in c["bins"]]',
     REPORT_TESTS),
    ("figure-transition-counts-transposed", "minirl/report.py",
     'ax.text(j, i, str(t["counts"][i][j])', 'ax.text(j, i, str(t["counts"][j][i])', REPORT_TESTS),
]

SFT_TESTS = ["tests/test_sft.py", "tests/test_sft_properties.py"]
SFT = [
    ("sft-second-eos", "minirl/sft.py", "    if not r or r[-1] != eos_id:\n", "    if True:\n", SFT_TESTS),
    ("sft-heldout-seed-not-passed", "minirl/sft.py",
     'generator=make_generator(seed, "sft-heldout-split")', 'generator=make_generator(0, "sft-heldout-split")',
     SFT_TESTS),
    ("sft-too-long-boundary", "minirl/sft.py", "        if len(s) <= max_len:\n", "        if len(s) < max_len:\n",
     SFT_TESTS),
    ("sft-pack-exact-fit-refused", "minirl/sft.py", "            if n <= room[r]:", "            if n < room[r]:",
     SFT_TESTS),
    ("sft-pack-window-off-by-one", "minirl/sft.py", "elif len(open_rows) > window:", "elif len(open_rows) >= window:",
     SFT_TESTS),
    ("sft-epoch-order-ignores-epoch", "minirl/sft.py",
     'generator=make_generator(seed, "sft-epoch-order", epoch)', 'generator=make_generator(seed, "sft-epoch-order")',
     SFT_TESTS),
    ("sft-padded-micro-batch-boundary", "minirl/sft.py",
     "if current and (len(current) + 1) * lengths[current[0][0]] > tokens_per_micro_batch:",
     "if current and (len(current) + 1) * lengths[current[0][0]] >= tokens_per_micro_batch:", SFT_TESTS),
    ("sft-heldout-leaves-train-mode", "minirl/sft.py", "    model.train(was_training)\n", "    model.train()\n",
     SFT_TESTS),
    ("sft-causal-context-off-by-one", "minirl/sft.py",
     "(lengths * (lengths + 1) / 2).sum()", "(lengths * (lengths - 1) / 2).sum()", SFT_TESTS),
    ("sft-flops-mlp-two-matrices", "minirl/sft.py",
     "per_layer = H * (q + 2 * kv) + q * H + 3 * H * I", "per_layer = H * (q + 2 * kv) + q * H + 2 * H * I", SFT_TESTS),
    ("sft-missing-finish-reason-dropped", "minirl/sft.py",
     'if rec.get("finish_reason", "stop") != "stop":', 'if rec.get("finish_reason") != "stop":', SFT_TESTS),
]

CHECKPOINT_TESTS = ["tests/test_model.py", "-k", "not smollm2", "tests/test_checkpoint_layouts.py"]
CHECKPOINT = [
    ("ckpt-tied-stored-head-refused", "minirl/checkpoint.py",
     '    if cfg.tie_word_embeddings:\n        found.pop("lm_head.weight", None)',
     '    if False:\n        found.pop("lm_head.weight", None)', CHECKPOINT_TESTS),
    ("ckpt-load-dtype-not-applied", "minirl/checkpoint.py",
     "state[name] = read_tensor(f, info, data_start).to(device=device, dtype=dtype)",
     "state[name] = read_tensor(f, info, data_start).to(device=device)", CHECKPOINT_TESTS),
    ("ckpt-saved-dtype-always-fp32", "minirl/checkpoint.py",
     'cfg["dtype"] = DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32")', 'cfg["dtype"] = "float32"',
     CHECKPOINT_TESTS),
    ("ckpt-save-dtype-not-passed", "minirl/checkpoint.py",
     "        if dtype is not None:\n            t = t.to(dtype)\n", "", CHECKPOINT_TESTS),
    ("ckpt-metadata-entry-read-as-tensor", "minirl/checkpoint.py", '    header.pop("__metadata__", None)\n', "",
     CHECKPOINT_TESTS),
    ("ckpt-last-shard-dropped", "minirl/checkpoint.py",
     "        size += nbytes\n    shards.append(current)\n", "        size += nbytes\n", CHECKPOINT_TESTS),
    ("ckpt-index-ignored", "minirl/checkpoint.py", "    if os.path.exists(index):\n", "    if False:\n",
     CHECKPOINT_TESTS),
    ("ckpt-rope-buffer-not-rebuilt", "minirl/checkpoint.py",
     "    model.inv_freq = rope_inverse_frequencies(cfg).to(device)  # buffers are not in the file\n", "",
     CHECKPOINT_TESTS),
]

MODEL_TESTS = ["tests/test_model.py"]
MODEL = [
    ("model-llama3-smooth-from-high", "minirl/model.py",
     "smooth = (old_len / wavelen - lo) / (hi - lo)", "smooth = (old_len / wavelen - hi) / (hi - lo)", MODEL_TESTS),
    ("model-qwen3-without-qk-norm", "minirl/model.py", 'qk_norm=(mt == "qwen3")', "qk_norm=False", MODEL_TESTS),
    ("model-segments-ignored", "minirl/model.py",
     "        if segment_ids is not None:\n            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])\n",
     "", MODEL_TESTS),
    ("model-rms-eps-default", "minirl/model.py", 'rms_norm_eps=d.get("rms_norm_eps", 1e-6)',
     'rms_norm_eps=d.get("rms_norm_eps", 1e-5)', MODEL_TESTS),
    ("model-kv-cache-column-offset", "minirl/model.py",
     "cols = torch.arange(T, device=device) + cache_start  # [T]", "cols = torch.arange(T, device=device)  # [T]",
     MODEL_TESTS),
]

TOKENIZER_TESTS = ["tests/test_tokenizer.py"]
TOKENIZER = [
    ("tok-generation-eos-list-ignored", "minirl/tokenizer.py",
     "for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):",
     "for i in (gen_eos[:1] if isinstance(gen_eos, list) else [gen_eos]):", TOKENIZER_TESTS),
    ("tok-pad-falls-back-to-zero", "minirl/tokenizer.py",
     "self.pad_token_id = pad if pad is not None else (eos[0] if eos else 0)",
     "self.pad_token_id = pad if pad is not None else 0", TOKENIZER_TESTS),
    ("tok-llama3-content-not-stripped", "minirl/tokenizer.py",
     "{m['content'].strip()}<|eot_id|>", "{m['content']}<|eot_id|>", TOKENIZER_TESTS),
    ("tok-bos-from-generation-config-ignored", "minirl/tokenizer.py",
     '            self.bos_token_id = self.generation_config.get("bos_token_id")\n',
     "            self.bos_token_id = None\n", TOKENIZER_TESTS),
]

TASKS_TESTS = ["tests/test_tasks.py"]
TASKS = [
    ("tasks-countdown-reuse-allowed", "minirl/tasks.py",
     "if Counter(parser.numbers) - Counter(numbers):", "if set(parser.numbers) - set(numbers):", TASKS_TESTS),
    ("tasks-countdown-floor-division", "minirl/tasks.py",
     'value = value * right if op == "*" else value / right', 'value = value * right if op == "*" else value // right',
     TASKS_TESTS),
    ("tasks-negative-answer-refused", "minirl/tasks.py", 'if re.fullmatch(r"[-+]?\\d{1,30}", answer)',
     'if re.fullmatch(r"\\d{1,30}", answer)', TASKS_TESTS),
    ("tasks-one-level-only", "minirl/tasks.py", "level = levels[k % len(levels)]", "level = levels[0]", TASKS_TESTS),
    ("tasks-minus-before-times", "minirl/tasks.py",
     'i = tokens.index("*") if "*" in tokens else 1', 'i = 1', TASKS_TESTS),
]

JUDGE_TESTS = ["tests/test_judge.py"]
JUDGE = [
    ("judge-kappa-chance-term-dropped", "minirl/judge.py",
     "pe = pa * pb + (1 - pa) * (1 - pb)", "pe = pa * pb", JUDGE_TESTS),
    ("judge-answer-line-first-not-last", "minirl/judge.py", "m = _LAST_LINE.match(lines[-1])",
     "m = _LAST_LINE.match(lines[0])", JUDGE_TESTS),
    ("judge-zero-count-shows", "minirl/judge.py", "else label > 0", "else label >= 0", JUDGE_TESTS),
    ("judge-accuracy-over-parsed-only", "minirl/judge.py",
     '"accuracy": sum(gi == pi for gi, pi in parsed) / len(g) if g',
     '"accuracy": sum(gi == pi for gi, pi in parsed) / max(len(parsed), 1) if g', JUDGE_TESTS),
    ("judge-torn-line-not-truncated", "minirl/judge.py",
     "            with open(self.path, \"r+b\") as f:\n                f.truncate(end)\n",
     "            pass\n", JUDGE_TESTS),
]

COMMON_TESTS = ["tests/test_common.py"]
COMMON = [
    ("common-generator-keys-after-first-ignored", "minirl/common.py",
     "tuple(int(k) for k in keys)", "tuple(int(k) for k in keys[:1])", COMMON_TESTS),
    ("common-fp16-is-bf16", "minirl/common.py", '"fp16": torch.float16,', '"fp16": torch.bfloat16,', COMMON_TESTS),
    ("common-file-mode-not-kept", "minirl/common.py",
     "mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else plain_mode(is_dir=False)",
     "mode = plain_mode(is_dir=False)", COMMON_TESTS),
    ("common-atomic-dir-modes-not-settled", "minirl/common.py", "        settle_tree(self.tmp)\n", "", COMMON_TESTS),
    ("common-jsonl-blank-lines-parsed", "minirl/common.py",
     "            if not line.strip():\n                continue\n            if pending is not None:",
     "            if pending is not None:", COMMON_TESTS),
    ("common-torn-tail-refused", "minirl/common.py",
     "            except MinirlError:\n                if not torn_tail:\n                    raise",
     "            except MinirlError:\n                raise", COMMON_TESTS),
]

# {module: [(name, file, text, replacement, why it changes nothing a user can observe)]}:
# reported and checked for staleness, not run.
EQUIVALENT = {
    "metrics": [("pass-at-k-zero-factor-boundary", "minirl/metrics.py",
     "prods[1:][i <= k] = 0.0", "prods[1:][i < k] = 0.0",
     "at i == k the factor 1 - k/i is exactly 0.0 in floating point, so the cumulative product is "
     "already (minus) zero there and 1 - prods is the same 1.0")],
    "checkpoint": [("ckpt-index-shards-not-deduplicated", "minirl/checkpoint.py",
     "names = sorted(set(json.load(f)[\"weight_map\"].values()))", "names = sorted(json.load(f)[\"weight_map\"].values())",
     "a shard named several times is read once anyway: headers is a dict keyed by the file's path")],
}

MODULES = {"wiring": MUTANTS, "metrics": METRICS, "report": REPORT, "sft": SFT, "checkpoint": CHECKPOINT,
           "model": MODEL, "tokenizer": TOKENIZER, "tasks": TASKS, "judge": JUDGE, "common": COMMON}


def load_siblings():
    """Modules added by tests/mutants_<module>.py files (MUTANTS, optional EQUIVALENT)."""
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "mutants_*.py"))):
        module = os.path.basename(path)[len("mutants_"):-len(".py")]
        spec = importlib.util.spec_from_file_location(f"mutants_{module}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        MODULES[module] = list(mod.MUTANTS)
        if getattr(mod, "EQUIVALENT", None):
            EQUIVALENT[module] = list(mod.EQUIVALENT)


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def times_found(path, text):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read().count(text)


def caught_by(stdout):
    """The id of the first failing test (or the file that failed to collect)."""
    for line in stdout.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else "pytest failed"


def run_mutant(name, path, text, replacement, tests, files):
    """(verdict, seconds, detail): verdict is caught, SURVIVED or stale."""
    found = times_found(path, text)
    if found != 1:
        return "stale", 0.0, f"text found {found} times in {path}"
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    try:  # a mutant that does not compile would be "caught" by any test: not a real bug
        compile(source.replace(text, replacement), path, "exec")
    except SyntaxError as e:
        return "stale", 0.0, f"the mutated {path} does not compile ({e.msg}, line {e.lineno})"
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
        if proc.returncode == 0:
            return "SURVIVED", time.time() - t0, proc.stdout.strip().splitlines()[-1]
        if proc.returncode in (4, 5):  # a test file not found, or no test collected: not a catch
            return "stale", time.time() - t0, f"pytest exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-200:]}"
        return "caught", time.time() - t0, caught_by(proc.stdout)


def parse_args():
    p = argparse.ArgumentParser(description="Plant one bug at a time and check that the tests catch it.")
    p.add_argument("words", nargs="*", help="only the mutants whose name contains one of these words")
    p.add_argument("--module", action="append", default=[], help="only this module's mutants (repeatable)")
    p.add_argument("--check", action="store_true", help="only check that every mutant's text is found once")
    p.add_argument("--list", action="store_true", help="list the modules and their number of mutants")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (each is one pytest process)")
    return p.parse_args()


def main():
    load_siblings()
    args = parse_args()
    unknown = [m for m in args.module if m not in MODULES]
    if unknown:
        sys.exit(f"mutate.py: unknown module {unknown[0]!r}; choose among {', '.join(MODULES)}")
    if args.list:
        for module, mutants in MODULES.items():
            print(f"{module:<12} {len(mutants):3d} mutants, {len(EQUIVALENT.get(module, [])):2d} equivalent")
        return
    modules = args.module or list(MODULES)
    chosen = [(mod, m) for mod in modules for m in MODULES[mod] if not args.words or any(w in m[0] for w in args.words)]
    equivalent = [(mod, e) for mod in modules for e in EQUIVALENT.get(mod, [])
                  if not args.words or any(w in e[0] for w in args.words)]
    t_start = time.time()
    rows, verdicts = [], []
    for mod, (name, path, text, _, reason) in equivalent:
        found = times_found(path, text)
        verdicts.append("equivalent" if found == 1 else "stale")
        rows.append((name, mod, f"equivalent: {reason}" if found == 1 else f"STALE: text found {found} times in {path}"))
    files = None if args.check else tracked_files()

    def one(m):
        if args.check:
            found = times_found(m[1], m[2])
            return ("ok", 0.0, "") if found == 1 else ("stale", 0.0, f"text found {found} times")
        return run_mutant(*m, files)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(one, m): (mod, m) for mod, m in chosen}
        done = {}
        for fut in concurrent.futures.as_completed(futures):
            mod, m = futures[fut]
            verdict, seconds, detail = done[m[0]] = fut.result()
            if not args.check or verdict != "ok":
                print(f"{m[0]:<42} {mod:<10} {verdict:<9} {seconds:6.0f}s  {detail}", flush=True)
    for mod, m in chosen:  # the table keeps the order of the lists
        verdict, _, detail = done[m[0]]
        verdicts.append(verdict)
        rows.append((m[0], mod, {"caught": f"caught by `{detail}`", "stale": f"STALE: {detail}"}.get(verdict, verdict)))
    total = time.time() - t_start
    n_run = len(chosen)
    if args.check:
        print(f"\n{verdicts.count('ok')} mutants and {verdicts.count('equivalent')} equivalent ones found once, "
              f"{verdicts.count('stale')} stale")
        sys.exit(1 if "stale" in verdicts else 0)
    print("\n| mutant | module | verdict |\n|---|---|---|")
    for name, mod, verdict in rows:
        print(f"| {name} | {mod} | {verdict} |")
    print(f"\n{verdicts.count('caught')} caught, {verdicts.count('SURVIVED')} survived, {verdicts.count('stale')} stale "
          f"of {n_run} run; {verdicts.count('equivalent')} equivalent (not run); {total / 60:.1f} min")
    bad = verdicts.count("SURVIVED") + verdicts.count("stale")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
