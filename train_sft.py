"""Supervised fine-tuning (distillation) of a causal LM on teacher responses.

    python train_sft.py                                   # distil the arithmetic teacher into the bundled tiny model
    python train_sft.py --model Qwen2.5-Math-1.5B --data teacher.jsonl --template boxed
    python train_sft.py --model base --data rl_samples.jsonl --only-correct --max-per-problem 8
    python train_sft.py --init-config config.json --tokenizer tok/ --data data.jsonl   # from scratch

Data (--data, jsonl): {"prompt": ..., "response": ...} pairs, chat {"messages": [...]} (loss on
the assistant turns only), or a samples file written by `evaluate.py sample` (self-
distillation and RL-to-base distillation; --only-correct, --max-per-problem). The loss is
the mean -log p over response tokens of each optimizer step, computed by the fused linear
log-prob kernel on the response positions only. Examples are packed into rows of --max-len
tokens (attention never crosses examples); --no-packing pads instead. See minirl/sft.py.

Run folder (--out): args.json, metrics.jsonl, checkpoints/step_N (HF folder + optimizer
state; `--resume` continues exactly), final/ (HF folder).
"""
import argparse
import json
import math
import os
import time

import torch

from minirl.checkpoint import load_model, save_model
from minirl.common import (MinirlError, default_device, default_dtype, parse_dtype,
                           seed_everything)
from minirl.model import ModelConfig, Transformer
from minirl.sft import (collate, drop_too_long, fmt_count, heldout_loss, is_samples_file,
                        layout_fill, load_sequences, micro_batches, plan_epoch, response_logprobs,
                        samples_template, split_heldout, task_sequences)
from minirl.common import BUNDLED_MODEL as DEFAULT_MODEL
from minirl.tokenizer import load_tokenizer
from minirl.training import (MasterAdamW, Progress, RunDir, grad_norm_and_finite, load_checkpoint,
                             lr_at, run_main, use_gradient_checkpointing)

TEMPLATES = ("chat", "boxed", "r1-zero", "raw")
TINY_LR = 2e-3   # the bundled 1.6M-parameter model: measured best of 1e-3 / 2e-3 (BENCHMARKS.md)
MODEL_LR = 1e-5  # a pretrained LLM: the usual full fine-tuning rate

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = parser.add_argument_group("model")
g.add_argument("--model", default=None,
               help=f"HF folder (or hub id) to fine-tune; unset (and no --init-config): the bundled {DEFAULT_MODEL}")
g.add_argument("--init-config", default=None,
               help="config.json of a new model built from scratch (seeded init) instead of --model")
g.add_argument("--init-std", type=float, default=0.02, help="std of the weights with --init-config")
g.add_argument("--tokenizer", default=None,
               help="folder with tokenizer.json (needed with --init-config; unset: the model's)")
g = parser.add_argument_group("data")
g.add_argument("--data", default=None,
               help="jsonl of prompt/response pairs, chat messages, or an evaluate.py samples file; "
                    "unset: teacher solutions of --task at --task-levels")
g.add_argument("--template", default=None, choices=TEMPLATES,
               help="prompt template (as in train_grpo.py); unset: a samples file's own template, else raw")
g.add_argument("--only-correct", action="store_true", help="samples file: keep correct responses only")
g.add_argument("--max-per-problem", type=int, default=None,
               help="samples file: at most K responses per problem (the lowest sample_index ones)")
g.add_argument("--val-data", default=None, help="held-out jsonl (same formats) for the eval loss")
g.add_argument("--val-fraction", type=float, default=None,
               help="fraction of problems (prompts) held out for the eval loss; unset: 0.05, or 0 with --val-data")
g.add_argument("--max-len", type=int, default=None,
               help="tokens per row (the longest example); unset: min(2048, the model's max_position_embeddings)")
g.add_argument("--on-too-long", default="skip", choices=("skip", "fail"),
               help="an example longer than --max-len: skip it (counted) or stop with an error")
g.add_argument("--task", default="arithmetic", choices=("arithmetic", "countdown"),
               help="synthetic task of the default data (its teacher's solutions)")
g.add_argument("--task-levels", default="1,2,3,4,5",
               help="difficulty levels of the default data: the base's 1-3 (so it does not forget them) and the new 4-5")
g.add_argument("--train-problems", type=int, default=24000, help="problems in the default data")
g = parser.add_argument_group("batching")
g.add_argument("--no-packing", action="store_true",
               help="one right-padded example per row instead of packing several per row")
g.add_argument("--tokens-per-micro-batch", type=int, default=8192,
               help="tokens in one forward/backward (the memory knob); packed: this // --max-len rows")
g.add_argument("--batch-tokens", type=int, default=None,
               help="tokens per optimizer step, as rows of --max-len; unset: 16384 unless --grad-accum")
g.add_argument("--grad-accum", type=int, default=None,
               help="packed micro-batches per optimizer step (instead of --batch-tokens)")
g = parser.add_argument_group("optimisation")
g.add_argument("--epochs", type=int, default=2, help="passes over the training data (the seed paper: 5)")
g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the schedule's length)")
g.add_argument("--lr", type=float, default=None,
               help=f"peak learning rate; unset: {TINY_LR:g} for the bundled model or --init-config "
                    f"(a few million parameters), else {MODEL_LR:g} (the seed paper's SFT of 1.5B models: 1e-6)")
g.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine", "linear"),
               help="after warmup (the seed paper: constant)")
g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps (the seed paper: 25)")
g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr for cosine and linear")
g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms and biases)")
g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2 (the seed paper's SFT: 0.95)")
g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: no clipping)")
g.add_argument("--max-bad-steps", type=int, default=5,
               help="stop after this many steps in a row with a non-finite loss or gradient")
g = parser.add_argument_group("run")
g.add_argument("--out", default=None, help="run folder (unset: runs/sft-<timestamp>)")
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
g.add_argument("--stop-after", type=int, default=None,
               help="stop this invocation after k steps (checkpointed; continue with --resume)")
g.add_argument("--seed", type=int, default=0,
               help="data order (per epoch), held-out split, --init-config weights, default data")
g.add_argument("--eval-every", type=int, default=50, help="held-out loss every k steps (0: only at the end)")
g.add_argument("--save-every", type=int, default=200, help="checkpoint every k steps (and at the end)")
g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
g.add_argument("--device", default=None, help="unset: cuda when available, else cpu")
g.add_argument("--dtype", default=None,
               help="weights: bf16 / fp32 (unset: bf16 on GPU, fp32 on CPU); AdamW state is always fp32")
g.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
               help="recompute each block's activations in backward (less memory); auto: on for CUDA")
g.add_argument("--wandb-project", default=None, help="also log to Weights & Biases (needs wandb)")
g.add_argument("--tensorboard", action="store_true", help="also log to <out>/tb (needs tensorboard)")

# Flags that decide the data, the model or the optimisation: a resumed run must use the
# values it started with, or it would not continue the same run.
RESUME_KEYS = ("model", "init_config", "init_std", "tokenizer", "data", "template", "only_correct",
               "max_per_problem", "val_data", "val_fraction", "max_len", "on_too_long", "task",
               "task_levels", "train_problems", "batch_tokens", "grad_accum", "tokens_per_micro_batch",
               "epochs", "max_steps", "lr", "lr_schedule", "warmup_steps", "min_lr_ratio",
               "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "seed")


def main(argv=None):
    args = parser.parse_args(argv)
    t_start = time.time()

    # ------------------------------------------------------------ flags (cheap checks first)
    if args.init_config and args.model:
        raise MinirlError("--init-config builds a new model: do not also give --model")
    if args.init_config and not args.tokenizer:
        raise MinirlError("--init-config needs --tokenizer (a folder with tokenizer.json)")
    if args.batch_tokens is not None and args.grad_accum is not None:
        raise MinirlError("--batch-tokens and --grad-accum both set the step size: give one")
    if args.val_data and args.val_fraction:
        raise MinirlError("--val-data and --val-fraction both choose the held-out set: give one")
    if args.resume and not args.out:
        raise MinirlError("--resume needs --out (the run folder to continue)")
    for flag in ("max_len", "tokens_per_micro_batch", "batch_tokens", "grad_accum", "max_per_problem",
                 "epochs", "max_steps", "train_problems", "stop_after"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise MinirlError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise MinirlError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for path, flag in ((args.data, "--data"), (args.val_data, "--val-data"), (args.init_config, "--init-config")):
        if path and not os.path.isfile(path):
            raise MinirlError(f"{flag} {path}: file not found")
    if args.data is None and (args.only_correct or args.max_per_problem):
        raise MinirlError("--only-correct / --max-per-problem apply to a samples file given with --data")
    if not args.init_config and not args.model:
        args.model = DEFAULT_MODEL
        if not os.path.isdir(args.model):
            raise MinirlError(f"{args.model}: the bundled tiny model is not there; pass --model "
                              "(an HF folder) or --init-config")
    if args.lr is None:
        bundled = os.path.realpath(args.model or "") == os.path.realpath(DEFAULT_MODEL)
        args.lr = TINY_LR if args.init_config or bundled else MODEL_LR
    if args.val_fraction is None:
        args.val_fraction = 0.0 if args.val_data else 0.05
    if args.batch_tokens is None and args.grad_accum is None:
        args.batch_tokens = 16384
    args.out = args.out or os.path.join("runs", "sft-" + time.strftime("%Y%m%d-%H%M%S"))
    if not args.resume and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        raise MinirlError(f"--out {args.out}: already holds a run; pass --resume to continue it "
                          "or choose another folder")
    device = torch.device(args.device) if args.device else default_device()
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    seed_everything(args.seed)

    # ------------------------------------------------------------ tokenizer and model config
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if not tokenizer.eos_token_ids:
        raise MinirlError(f"{args.tokenizer or args.model}: the tokenizer has no eos token "
                          "(responses must end with one)")
    eos_ids = tokenizer.eos_token_ids
    if args.init_config:
        try:
            with open(args.init_config, encoding="utf-8") as f:
                config = ModelConfig.from_hf(json.load(f), source=args.init_config)
        except json.JSONDecodeError as e:
            raise MinirlError(f"{args.init_config}: not valid JSON ({e.msg}, line {e.lineno})") from None
    else:
        from minirl.checkpoint import read_config, resolve_model_path
        config = read_config(resolve_model_path(args.model))
    if tokenizer.vocab_size > config.vocab_size:
        raise MinirlError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                          f"is {config.vocab_size}")
    if args.max_len is None:
        args.max_len = min(2048, config.max_position_embeddings)
    if args.max_len > args.tokens_per_micro_batch:
        raise MinirlError(f"--tokens-per-micro-batch {args.tokens_per_micro_batch} is smaller than "
                          f"--max-len {args.max_len}: one row must fit in a micro-batch")
    if args.batch_tokens is not None and args.batch_tokens < args.max_len:
        raise MinirlError(f"--batch-tokens {args.batch_tokens} is smaller than --max-len {args.max_len}")

    # ------------------------------------------------------------ data (every check before the model loads)
    if args.data and is_samples_file(args.data):
        own = samples_template(args.data)
        if args.template is None:
            args.template = own or "raw"
        elif own and own != args.template:
            print(f"note: {args.data} was sampled with template {own!r}; training with --template "
                  f"{args.template!r}")
    args.template = args.template or "raw"
    if args.data:
        seqs, counts = load_sequences(args.data, tokenizer, args.template, eos_ids,
                                      args.only_correct, args.max_per_problem)
        dropped = {k: v for k, v in counts.items() if k in ("incorrect", "truncated", "over_max_per_problem") and v}
        if "samples" in counts:
            print(f"data: {args.data}: {counts['samples']} samples of {counts['problems']} problems, "
                  f"{len(seqs)} kept" + (f" (dropped: {dropped})" if dropped else ""))
    else:
        levels = [int(x) for x in args.task_levels.split(",") if x.strip()]
        seqs = task_sequences(tokenizer, eos_ids[0], args.task, args.train_problems, args.seed, levels,
                              args.template)
        print(f"data: {len(seqs)} teacher solutions of {args.task} levels {levels} (seed {args.seed})")
    seqs, too_long = drop_too_long(seqs, args.max_len, args.on_too_long)
    if too_long:
        print(f"skipped {too_long} example(s) longer than --max-len {args.max_len} (--on-too-long skip)")
    if args.val_data:
        samples = is_samples_file(args.val_data)  # held-out samples: the same filters
        val, _ = load_sequences(args.val_data, tokenizer, args.template, eos_ids,
                                samples and args.only_correct, args.max_per_problem if samples else None)
        val, val_long = drop_too_long(val, args.max_len, args.on_too_long)
        if val_long:
            print(f"skipped {val_long} held-out example(s) longer than --max-len {args.max_len}")
        train = seqs
    else:
        train, val = split_heldout(seqs, args.val_fraction, args.seed)
    if not train:
        raise MinirlError(f"{args.data or args.task}: no training examples left "
                          f"(after --max-len {args.max_len} and the held-out split)")
    lengths = [len(s) for s in train]
    targets_of = [s.num_targets for s in train]  # response tokens each example is trained on

    # ------------------------------------------------------------ the plan: every epoch's steps
    rows_per_micro_batch = max(1, args.tokens_per_micro_batch // args.max_len)
    if args.grad_accum is not None:
        rows_per_step = args.grad_accum * rows_per_micro_batch
    else:
        rows_per_step = max(1, args.batch_tokens // args.max_len)
    plans = [plan_epoch(lengths, args.seed, e, args.max_len, rows_per_step) for e in range(args.epochs)]
    step_epoch = [(e, j) for e, plan in enumerate(plans) for j in range(len(plan))]
    total_steps = len(step_epoch) if args.max_steps is None else min(args.max_steps, len(step_epoch))
    fill = layout_fill(plans[0], lengths, not args.no_packing, args.max_len, args.tokens_per_micro_batch)
    print(f"train: {len(train)} examples, {fmt_count(sum(lengths))} tokens "
          f"({fmt_count(sum(targets_of))} response), held out: {len(val)}; "
          f"{'packed' if not args.no_packing else 'padded'} rows of <= {args.max_len} tokens, "
          f"{fill:.1%} of computed positions are real tokens; "
          f"{len(plans[0])} steps/epoch x {args.epochs} epochs -> {total_steps} steps")

    # ------------------------------------------------------------ run folder, model, optimizer
    run = RunDir(args.out)
    resolved = vars(args)
    start_step, extra = 0, {}
    # --resume with no checkpoint yet starts the run (so a preemptible job can always pass it).
    ckpt = run.latest_checkpoint() if args.resume else None
    if ckpt is not None:
        saved_path = os.path.join(args.out, "args.json")
        saved = json.load(open(saved_path, encoding="utf-8")) if os.path.exists(saved_path) else {}
        for k in RESUME_KEYS:
            if k in saved and saved[k] != resolved[k]:
                raise MinirlError(f"--resume: --{k.replace('_', '-')} is {resolved[k]!r} but the run in "
                                  f"{args.out} used {saved[k]!r}; resume with the same value")
    else:
        if args.resume:
            print(f"--resume: no checkpoint in {args.out} yet; starting the run")
            run.truncate_metrics(-1)
        run.save_args(resolved)
    run.enable_loggers(args.wandb_project, args.tensorboard, os.path.basename(args.out), resolved)

    if ckpt is not None:
        model, state = load_checkpoint(ckpt, device, dtype)
        start_step, extra = state["step"], state.get("extra", {})
    elif args.init_config:
        with torch.device(device):
            model = Transformer(config)
        model.init_weights(args.init_std, generator=torch.Generator(device).manual_seed(args.seed))
        model.to(dtype)
    else:
        model = load_model(args.model, device=device, dtype=dtype)
    model.train()
    model.gradient_checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, device)
    optimizer = MasterAdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(state["optimizer"])
        run.truncate_metrics(start_step)
        print(f"resumed from {ckpt} at step {start_step}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.init_config or args.model} ({n_params / 1e6:.2f}M parameters, {dtype}, {device}); "
          f"run folder: {args.out}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    def eval_loss():
        return heldout_loss(model, val, args.max_len, args.tokens_per_micro_batch, pad_id, device)

    def save(step):
        run.save_checkpoint(step, model, tokenizer, optimizer, extra=extra, keep_last=args.keep_last)

    # ------------------------------------------------------------ the loop
    if start_step == 0 and val:
        v = eval_loss()
        run.log({"step": 0, "val_loss": v})
        print(f"step 0 | val loss {v:.4f}")
    tokens_seen = extra.get("tokens", 0)
    bad_in_row = extra.get("bad_in_row", 0)
    progress = Progress(total_steps, done=start_step)
    last_step = min(total_steps, start_step + args.stop_after) if args.stop_after else total_steps
    for step in range(start_step, last_step):
        t0 = time.time()
        epoch, j = step_epoch[step]
        lr = lr_at(step, args.lr, args.warmup_steps, total_steps, args.lr_schedule, args.min_lr_ratio)
        optimizer.set_lr(lr)
        step_rows = plans[epoch][j]
        # Normalise by the target tokens of the whole step, so the layout (packing, padding,
        # micro-batches) changes nothing but rounding.
        n_targets = sum(targets_of[i] for row in step_rows for i in row)
        n_tokens = sum(lengths[i] for row in step_rows for i in row)
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches(step_rows, lengths, not args.no_packing, args.max_len,
                                args.tokens_per_micro_batch):
            batch = collate(train, mb, pad_id, device)
            logp = response_logprobs(model, batch)  # [N] fp32
            loss = -logp.sum() / n_targets
            loss.backward()
            loss_sum += loss.detach()
        loss_value = float(loss_sum)  # the step's one host synchronisation
        grad_norm, finite = grad_norm_and_finite(model.parameters(), args.grad_clip)
        skipped = not (finite and math.isfinite(loss_value))
        if skipped:
            bad_in_row += 1
            print(f"step {step + 1}: non-finite loss ({loss_value}) or grad norm ({grad_norm}); "
                  f"update skipped ({bad_in_row} in a row)")
            if bad_in_row >= args.max_bad_steps:
                raise MinirlError(f"{bad_in_row} steps in a row with a non-finite loss or gradient "
                                  f"(--max-bad-steps {args.max_bad_steps}); lower --lr or check the data")
        else:
            bad_in_row = 0
            optimizer.step()
        optimizer.zero_grad()
        tokens_seen += n_tokens
        dt = time.time() - t0
        done = step + 1
        record = {"step": done, "epoch": round(epoch + (j + 1) / len(plans[epoch]), 4),
                  "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                  "step_tokens": n_tokens, "step_response_tokens": n_targets,
                  "tokens_per_s": n_tokens / dt, "time_s": round(time.time() - t_start, 3)}
        if skipped:
            record["skipped"] = True
        if device.type == "cuda":
            record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        line = (f"step {done}/{total_steps} | epoch {record['epoch']:.2f} | loss {loss_value:.4f} | "
                f"lr {lr:.2e} | gnorm {grad_norm:.3f} | {fmt_count(n_tokens / dt)} tok/s | "
                f"{fmt_count(tokens_seen)} tok")
        if val and (done == total_steps or (args.eval_every and done % args.eval_every == 0)):
            record["val_loss"] = eval_loss()
            line += f" | val {record['val_loss']:.4f}"
        run.log(record)
        print(f"{line} | {progress.eta(done)}", flush=True)
        extra = {"tokens": tokens_seen, "bad_in_row": bad_in_row}
        if done in (total_steps, last_step) or (args.save_every and done % args.save_every == 0):
            save(done)

    if last_step < total_steps:
        print(f"stopped after step {last_step} (--stop-after); continue with --resume --out {args.out}")
        return None

    final = os.path.join(args.out, "final")
    save_model(model, final, tokenizer=tokenizer)
    print(f"saved {final} ({time.time() - t_start:.0f}s)")
    return final


if __name__ == "__main__":
    run_main(main)
