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

The script, top to bottom: check every flag (nothing is loaded or written before they are
good), load the tokenizer and the data, plan every epoch's steps, open the run folder, build
the model and measure the held-out set; then the loop of steps (accumulate_gradients ->
apply_update -> log_step); at the end the held-out set again, as a before/after table.

Run folder (--out): args.json, metrics.jsonl, checkpoints/step_N (HF folder + optimizer
state; `--resume` continues exactly), final/ (HF folder), summary.json (held-out loss and,
for the default task data, held-out accuracy, before and after training).

More than one GPU: `torchrun --nproc_per_node N train_sft.py ...` gives each rank every N-th
row of each step (global token denominators, so the update equals one process's up to
rounding), shards weights, gradients and AdamW state with FSDP2, writes sharded (DCP)
checkpoints, and rank 0 alone prints and writes. See minirl/distributed.py, docs/distributed.md.
"""
import argparse
import importlib.util
import json
import math
import os
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

from minirl import distributed
from minirl.checkpoint import load_model, read_config, resolve_model_path, save_model
from minirl.common import BUNDLED_MODEL as DEFAULT_MODEL
from minirl.common import MinirlError, atomic_write_json, default_device, default_dtype, make_generator, parse_dtype
from minirl.data import format_prompt
from minirl.model import ModelConfig, Transformer
from minirl.sampler import generate
from minirl.sft import (collate, drop_too_long, fmt_count, heldout_loss, is_samples_file, layout_fill,
                        load_sequences, micro_batches, plan_epoch, prompt_add_special_tokens,
                        response_logprobs, samples_template, split_heldout, task_sequences)
from minirl.tasks import LEVELS, make_problems, verify
from minirl.tokenizer import load_tokenizer
from minirl.training import (BadSteps, MasterAdamW, Progress, RunDir, check_out_dir, check_resume_args,
                             grad_norm_and_finite, load_checkpoint, lr_at, run_main,
                             use_gradient_checkpointing)

TEMPLATES = ("chat", "boxed", "r1-zero", "raw")
TINY_LR = 2e-3   # the bundled 1.6M-parameter model: measured best of 1e-3 / 2e-3 (BENCHMARKS.md)
MODEL_LR = 1e-5  # a pretrained LLM: the usual full fine-tuning rate
KIM = "Kim et al., arXiv 2505.14216"  # the SFT settings the help texts compare with

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
g = parser.add_argument_group("held-out accuracy (default task data only)")
g.add_argument("--eval-problems", type=int, default=64,
               help="held-out problems whose answers are sampled and graded before and after training (0: none)")
g.add_argument("--eval-samples", type=int, default=4, help="samples per problem (temperature 1) for pass@1")
g.add_argument("--max-new-tokens", type=int, default=None,
               help="longest answer sampled; unset: --max-len minus the longest held-out prompt")
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
g.add_argument("--epochs", type=int, default=2, help=f"passes over the training data ({KIM}: 5)")
g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the schedule's length)")
g.add_argument("--lr", type=float, default=None,
               help=f"peak learning rate; unset: {TINY_LR:g} for the bundled model or --init-config "
                    f"(a few million parameters), else {MODEL_LR:g} ({KIM}, SFT of 1.5B models: 1e-6)")
g.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine", "linear"),
               help=f"after warmup ({KIM}: constant)")
g.add_argument("--warmup-steps", type=int, default=20, help=f"linear warmup steps ({KIM}: 25)")
g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr for cosine and linear")
g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms and biases)")
g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
g.add_argument("--adam-beta2", type=float, default=0.95, help=f"AdamW beta2 ({KIM}: 0.95)")
g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: no clipping)")
g.add_argument("--max-bad-steps", type=int, default=5,
               help="stop (exit status 1) after this many steps in a row with a non-finite loss or gradient")
g = parser.add_argument_group("run")
g.add_argument("--out", default=None, help="run folder (unset: runs/sft-<timestamp>)")
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
g.add_argument("--stop-after", type=int, default=None,
               help="stop this invocation after k steps (checkpointed; continue with --resume)")
g.add_argument("--seed", type=int, default=0,
               help="data order (per epoch), held-out split, --init-config weights, default data, held-out samples")
g.add_argument("--eval-every", type=int, default=50, help="held-out loss every k steps (0: only at the end)")
g.add_argument("--save-every", type=int, default=200, help="checkpoint every k steps (and at the end)")
g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (0: all)")
g.add_argument("--device", default=None, help="unset: cuda when available, else cpu")
g.add_argument("--dtype", default=None,
               help="weights: bf16 / fp32 (unset: bf16 on GPU, fp32 on CPU); AdamW state is always fp32")
g.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
               help="recompute each block's activations in backward (less memory); auto: on for CUDA")
g.add_argument("--wandb-project", default=None, help="also log to Weights & Biases (needs wandb)")
g.add_argument("--tensorboard", action="store_true", help="also log to <out>/tb (needs tensorboard)")

# Settings a resumed run may change: where and how often it logs and saves, how long this
# invocation runs, the device and memory knobs that do not change the numbers. Every other
# setting must equal the run's args.json, or it would not continue the same run.
MAY_CHANGE_ON_RESUME = {"resume", "out", "stop_after", "eval_every", "save_every", "keep_last", "device",
                        "gradient_checkpointing", "max_bad_steps", "wandb_project", "tensorboard"}


# ---------------------------------------------------------------- setup phases


def check_flags(args):
    """Every check that needs no file read: one line naming the flag, before any work."""
    def bad(flag, why):
        raise MinirlError(f"{flag} {why}")

    if args.init_config and args.model:
        bad("--init-config", "builds a new model: do not also give --model")
    if args.init_config and not args.tokenizer:
        bad("--init-config", "needs --tokenizer (a folder with tokenizer.json)")
    if args.batch_tokens is not None and args.grad_accum is not None:
        raise MinirlError("--batch-tokens and --grad-accum both set the step size: give one")
    if args.val_data and args.val_fraction:
        raise MinirlError("--val-data and --val-fraction both choose the held-out set: give one")
    if args.resume and not args.out:
        bad("--resume", "needs --out (the run folder to continue)")
    if args.data is None and (args.only_correct or args.max_per_problem):
        raise MinirlError("--only-correct / --max-per-problem apply to a samples file given with --data")
    for name in ("max_len", "tokens_per_micro_batch", "batch_tokens", "grad_accum", "max_per_problem", "epochs",
                 "max_steps", "train_problems", "stop_after", "max_bad_steps", "eval_samples", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            bad("--" + name.replace("_", "-"), f"must be >= 1, got {v}")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "eval_problems"):
        if getattr(args, name) < 0:
            bad("--" + name.replace("_", "-"), f"must be >= 0, got {getattr(args, name)}")
    # Written as `not (a <= v < b)` so that nan fails too.
    for flag, v, ok, rule in (("--lr", args.lr, args.lr is None or 0 < args.lr < math.inf, "> 0"),
                              ("--init-std", args.init_std, 0 < args.init_std < math.inf, "> 0"),
                              ("--min-lr-ratio", args.min_lr_ratio, 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
                              ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, ">= 0"),
                              ("--adam-beta1", args.adam_beta1, 0 <= args.adam_beta1 < 1, "in [0, 1)"),
                              ("--adam-beta2", args.adam_beta2, 0 <= args.adam_beta2 < 1, "in [0, 1)"),
                              ("--grad-clip", args.grad_clip, 0 <= args.grad_clip < math.inf, ">= 0 (0: off)"),
                              ("--val-fraction", args.val_fraction,
                               args.val_fraction is None or 0 <= args.val_fraction < 1, "in [0, 1)")):
        if not ok:
            bad(flag, f"must be {rule}, got {v}")
    check_paths(args)
    args.levels = parse_levels(args.task_levels)
    args.torch_device = parse_device(args.device)
    try:
        args.torch_dtype = parse_dtype(args.dtype) or default_dtype(args.torch_device)
    except MinirlError as e:
        bad("--dtype", f"{args.dtype}: {e}")
    for flag, on, module in (("--wandb-project", args.wandb_project, "wandb"),
                             ("--tensorboard", args.tensorboard, "tensorboard")):
        if on and importlib.util.find_spec(module) is None:
            bad(flag, f"needs the {module} package, which is not installed")
    args.out = args.out or os.path.join("runs", "sft-" + time.strftime("%Y%m%d-%H%M%S"))
    check_out_dir(args.out, args.resume)  # tries a write: os.access says yes to root even in /proc


def check_paths(args):
    for path, flag in ((args.data, "--data"), (args.val_data, "--val-data"), (args.init_config, "--init-config")):
        if path and not os.path.isfile(path):
            raise MinirlError(f"{flag} {path}: file not found")
    if not args.init_config and not args.model:
        args.model = DEFAULT_MODEL
        if not os.path.isdir(args.model):
            raise MinirlError(f"{args.model}: the bundled tiny model is not there; pass --model "
                              "(an HF folder) or --init-config")
    for path, flag in ((args.model, "--model"), (args.tokenizer, "--tokenizer")):
        hub_id = path and path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if path and not os.path.isdir(path) and not hub_id:
            raise MinirlError(f"{flag} {path}: folder not found")


def parse_levels(text):
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MinirlError(f"--task-levels {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not levels or any(lv not in LEVELS for lv in levels):
        raise MinirlError(f"--task-levels {text!r}: levels must be among {list(LEVELS)}")
    return levels


def parse_device(name):
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MinirlError(f"--device {name!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinirlError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_defaults(args, config):
    """The values of the flags left unset (saved in args.json, checked on resume)."""
    if args.lr is None:
        bundled = os.path.realpath(args.model or "") == os.path.realpath(DEFAULT_MODEL)
        args.lr = TINY_LR if args.init_config or bundled else MODEL_LR
    if args.val_fraction is None:
        args.val_fraction = 0.0 if args.val_data else 0.05
    if args.batch_tokens is None and args.grad_accum is None:
        args.batch_tokens = 16384
    if args.max_len is None:
        args.max_len = min(2048, config.max_position_embeddings)
    if args.max_len > args.tokens_per_micro_batch:
        raise MinirlError(f"--tokens-per-micro-batch {args.tokens_per_micro_batch} is smaller than "
                          f"--max-len {args.max_len}: one row must fit in a micro-batch")
    if args.batch_tokens is not None and args.batch_tokens < args.max_len:
        raise MinirlError(f"--batch-tokens {args.batch_tokens} is smaller than --max-len {args.max_len}")


def load_tokenizer_and_config(args):
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if not tokenizer.eos_token_ids:
        raise MinirlError(f"{args.tokenizer or args.model}: the tokenizer has no eos token "
                          "(responses must end with one)")
    if args.init_config:
        try:
            with open(args.init_config, encoding="utf-8") as f:
                config = ModelConfig.from_hf(json.load(f), source=args.init_config)
        except json.JSONDecodeError as e:
            raise MinirlError(f"{args.init_config}: not valid JSON ({e.msg}, line {e.lineno})") from None
    else:
        config = read_config(resolve_model_path(args.model))
    if tokenizer.vocab_size > config.vocab_size:
        raise MinirlError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                          f"is {config.vocab_size}")
    return tokenizer, config


def load_data(args, tokenizer):
    """train and val Sequences, and the held-out task problems whose answers are graded."""
    eos_ids = tokenizer.eos_token_ids
    if args.data and is_samples_file(args.data):
        own = samples_template(args.data)
        if args.template is None:
            args.template = own or "raw"
        elif own and own != args.template:
            print(f"note: {args.data} was sampled with template {own!r}; training with --template {args.template!r}")
    args.template = args.template or "raw"
    problems = []
    if args.data:
        seqs, counts = load_sequences(args.data, tokenizer, args.template, eos_ids,
                                      args.only_correct, args.max_per_problem)
        dropped = {k: v for k, v in counts.items() if k in ("incorrect", "truncated", "over_max_per_problem") and v}
        if "samples" in counts:
            print(f"data: {args.data}: {counts['samples']} samples of {counts['problems']} problems, "
                  f"{len(seqs)} kept" + (f" (dropped: {dropped})" if dropped else ""))
    else:
        problems = make_problems(args.task, args.train_problems, args.seed, levels=args.levels)
        seqs = task_sequences(tokenizer, eos_ids[0], problems, args.template)
        print(f"data: {len(seqs)} teacher solutions of {args.task} levels {args.levels} (seed {args.seed})")
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
    held_out = {s.group for s in val}
    eval_problems = [p for p in problems if p.id in held_out][:args.eval_problems]
    return SimpleNamespace(train=train, val=val, eval_problems=eval_problems,
                           eval_prompts=encode_prompts(args, tokenizer, eval_problems))


def encode_prompts(args, tokenizer, problems):
    special = prompt_add_special_tokens(args.template, tokenizer)
    return [tokenizer.encode(format_prompt(p.question, args.template, tokenizer), add_special_tokens=special)
            for p in problems]


def plan_steps(args, train):
    """Every epoch's optimizer steps (rows of example indices), fixed before training."""
    lengths = [len(s) for s in train]
    targets_of = [s.num_targets for s in train]  # response tokens each example is trained on
    rows_per_micro_batch = max(1, args.tokens_per_micro_batch // args.max_len)
    if args.grad_accum is not None:
        rows_per_step = args.grad_accum * rows_per_micro_batch
    else:
        rows_per_step = max(1, args.batch_tokens // args.max_len)
    epochs = [plan_epoch(lengths, args.seed, e, args.max_len, rows_per_step) for e in range(args.epochs)]
    step_epoch = [(e, j) for e, plan in enumerate(epochs) for j in range(len(plan))]
    total = len(step_epoch) if args.max_steps is None else min(args.max_steps, len(step_epoch))
    fill = layout_fill(epochs[0], lengths, not args.no_packing, args.max_len, args.tokens_per_micro_batch)
    print(f"train: {len(train)} examples, {fmt_count(sum(lengths))} tokens "
          f"({fmt_count(sum(targets_of))} response); "
          f"{'packed' if not args.no_packing else 'padded'} rows of <= {args.max_len} tokens, "
          f"{fill:.1%} of computed positions are real tokens; "
          f"{len(epochs[0])} steps/epoch x {args.epochs} epochs -> {total} steps")
    return SimpleNamespace(epochs=epochs, step_epoch=step_epoch, total=total, lengths=lengths,
                           targets_of=targets_of)


def open_run(args, dist):
    """The run folder, and the checkpoint to resume from (None: a new run). Written only now,
    after every input was checked; under torchrun rank 0 alone writes and chooses."""
    run = RunDir(args.out)
    # --resume with no checkpoint yet starts the run (so a preemptible job can always pass it).
    ckpt, notes = distributed.from_main(run.resume_checkpoint, dist) if args.resume else (None, [])
    for note in notes:  # damaged checkpoints skipped, leftovers of an interrupted save removed
        print(note, flush=True)
    saved_path = os.path.join(args.out, "args.json")
    if ckpt is not None and os.path.exists(saved_path):
        with open(saved_path, encoding="utf-8") as f:
            check_resume_args(json.load(f), settings(args), MAY_CHANGE_ON_RESUME, args.out)
    if not dist.main:
        return run, ckpt
    if ckpt is None:
        if args.resume:
            print(f"--resume: no checkpoint in {args.out} yet; starting the run")
            for note in run.truncate_metrics(-1):
                print(note, flush=True)
        run.save_args(settings(args))
    run.enable_loggers(args.wandb_project, args.tensorboard, os.path.basename(args.out), settings(args))
    return run, ckpt


def settings(args):
    """The resolved flags as saved in args.json (without the parsed device and dtype objects)."""
    return {k: v for k, v in vars(args).items() if k not in ("torch_device", "torch_dtype", "levels")}


def build_model(args, config, ckpt, run, dist):
    """(model, optimizer, first step, saved loop state) from the checkpoint, --init-config or --model.
    Under torchrun the weights are fp32 and sharded (FSDP2: they are the master weights),
    and compute runs in --dtype."""
    device, dtype = args.torch_device, args.torch_dtype
    if dist.on or distributed.is_sharded_checkpoint(ckpt):
        return build_sharded_model(args, config, ckpt, run, dist)
    start_step, extra = 0, {}
    if ckpt is not None:
        model, state = load_checkpoint(ckpt, device, dtype)
        start_step, extra = state["step"], state.get("extra", {})
    elif args.init_config:
        model = Transformer(config)  # initialised on the CPU: the same weights on every device
        model.init_weights(args.init_std, generator=make_generator(args.seed, "init-weights"))
        model.to(device=device, dtype=dtype)
    else:
        model = load_model(args.model, device=device, dtype=dtype)
    model, optimizer = prepare(model, args)
    if ckpt is not None:
        optimizer.load_state_dict(state["optimizer"])
        for note in run.truncate_metrics(start_step):
            print(note, flush=True)
        print(f"resumed from {ckpt} at step {start_step}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.init_config or args.model} ({n_params / 1e6:.2f}M parameters, {dtype}, {device}); "
          f"run folder: {args.out}")
    return model, optimizer, start_step, extra


def prepare(model, args):
    """Training mode, gradient checkpointing, and the optimizer (fp32 master weights)."""
    model.train()
    model.gradient_checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, args.torch_device)
    optimizer = MasterAdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay)
    return model, optimizer


# ---------------------------------------------------------------- more than one process (torchrun)


def build_sharded_model(args, config, ckpt, run, dist):
    """build_model under torchrun, or for a checkpoint written under torchrun: fp32 weights
    (from --model / --init-config, then the checkpoint's shards: DCP reshards them to this
    run's number of ranks), FSDP2 over the ranks, compute in --dtype."""
    if args.init_config:
        model = Transformer(config)
        model.init_weights(args.init_std, generator=make_generator(args.seed, "init-weights"))
        model.to(device=args.torch_device)
    else:
        model = load_model(args.model, device=args.torch_device, dtype=torch.float32)
    model = distributed.shard(model, dist, compute_dtype=args.torch_dtype)
    model, optimizer = prepare(model, args)
    start_step, extra = 0, {}
    if ckpt is not None:
        state, resharded = distributed.load_checkpoint(ckpt, model, optimizer, dist)
        start_step, extra = state["step"], state["extra"]
        if dist.main:
            for note in run.truncate_metrics(start_step):
                print(note, flush=True)
        print(f"resumed from {ckpt} at step {start_step}{resharded}")
    if not dist.on and args.torch_dtype != torch.float32:  # one process: compute weights + fp32 masters
        sd = {"opt": optimizer.opt.state_dict(), "master": [p.detach().clone() for p in model.parameters()]}
        model, optimizer = prepare(model.to(args.torch_dtype), args)
        optimizer.load_state_dict(sd)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.init_config or args.model} ({n_params / 1e6:.2f}M parameters, fp32 sharded over "
          f"{dist.world} rank(s), compute {args.torch_dtype}, {args.torch_device}); run folder: {args.out}")
    return model, optimizer, start_step, extra


# ---------------------------------------------------------------- held-out evaluation


def evaluate(model, data, args, tokenizer, dist, accuracy=True):
    """Held-out loss (mean -log p over the held-out response tokens) and, for task problems,
    held-out accuracy: greedy, and pass@1 as the mean over --eval-samples samples at
    temperature 1 (one seeded stream, the same before and after training). Under torchrun
    every rank computes it on a plain replica of the weights (the same numbers everywhere)."""
    model = distributed.replica(model, dist, args.torch_dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_ids[0]
    result = {"examples": len(data.val), "loss": None, "accuracy": None}
    if data.val:
        result["loss"] = heldout_loss(model, data.val, args.max_len, args.tokens_per_micro_batch, pad_id,
                                      args.torch_device)
    if accuracy and data.eval_problems:
        result["accuracy"] = task_accuracy(model, data, args, tokenizer)
    return result


@torch.no_grad()
def task_accuracy(model, data, args, tokenizer):
    """{level or "all": {"problems", "greedy", "pass@1"}} on the held-out task problems."""
    max_new = args.max_new_tokens or max(1, args.max_len - max(len(p) for p in data.eval_prompts))
    model.eval()
    stop = tokenizer.eos_token_ids
    greedy = generate(model, data.eval_prompts, n=1, max_new_tokens=max_new, temperature=0.0, stop_token_ids=stop)
    sampled = generate(model, data.eval_prompts, n=args.eval_samples, max_new_tokens=max_new, temperature=1.0,
                       stop_token_ids=stop, generator=make_generator(args.seed, "sft-heldout-samples"))
    model.train()
    sums = defaultdict(lambda: [0, 0.0, 0.0])  # level -> [problems, greedy correct, pass@1 sum]
    for p, g, group in zip(data.eval_problems, greedy, sampled):
        correct = verify(p, tokenizer.decode(g[0].token_ids))
        pass1 = sum(verify(p, tokenizer.decode(c.token_ids)) for c in group) / len(group)
        for key in ("all", str(p.difficulty)):
            sums[key][0] += 1
            sums[key][1] += correct
            sums[key][2] += pass1
    return {k: {"problems": n, "greedy": gr / n, "pass@1": p1 / n} for k, (n, gr, p1) in sorted(sums.items())}


def eval_fields(ev):
    """The metrics.jsonl fields of an evaluation."""
    out = {"val_loss": ev["loss"]} if ev["loss"] is not None else {}
    if ev["accuracy"]:
        out.update({"heldout_greedy": ev["accuracy"]["all"]["greedy"],
                    "heldout_pass@1": ev["accuracy"]["all"]["pass@1"]})
    return out


def describe(ev):
    parts = [f"loss {ev['loss']:.4f}"] if ev["loss"] is not None else []
    if ev["accuracy"]:
        parts += [f"greedy {ev['accuracy']['all']['greedy']:.3f}", f"pass@1 {ev['accuracy']['all']['pass@1']:.3f}"]
    return ", ".join(parts) or "nothing held out"


def before_after_table(before, after):
    lines = ["held-out, before -> after SFT"]
    if after["loss"] is not None:
        lines.append(f"  loss ({after['examples']} examples): {before['loss']:.4f} -> {after['loss']:.4f}")
    if after["accuracy"]:
        lines.append(f"  {'level':>5} {'problems':>8} {'greedy before':>13} {'greedy after':>12} "
                     f"{'pass@1 before':>13} {'pass@1 after':>12}")
        for k in sorted(after["accuracy"], key=lambda k: (k == "all", k)):
            b, a = before["accuracy"][k], after["accuracy"][k]
            lines.append(f"  {k:>5} {a['problems']:>8} {b['greedy']:>13.3f} {a['greedy']:>12.3f} "
                         f"{b['pass@1']:>13.3f} {a['pass@1']:>12.3f}")
    if len(lines) == 1:
        lines.append("  nothing held out (--val-fraction 0 and no --val-data)")
    return "\n".join(lines)


# ---------------------------------------------------------------- one optimizer step


def accumulate_gradients(model, train, step_rows, plan, args, pad_id, dist):
    """Forward and backward of one step's rows, micro-batch by micro-batch. Returns the
    step loss (mean -log p over the step's response tokens), its tokens and response tokens.
    Under torchrun each rank takes every N-th row (distributed.split) and FSDP2 sums the
    gradients."""
    # Normalise by the target tokens of the whole step (all ranks), so the layout (packing,
    # padding, micro-batches, ranks) changes nothing but rounding.
    n_targets = sum(plan.targets_of[i] for row in step_rows for i in row)
    n_tokens = sum(plan.lengths[i] for row in step_rows for i in row)
    per_rank = [micro_batches(rows, plan.lengths, not args.no_packing, args.max_len, args.tokens_per_micro_batch)
                for rows in distributed.shares(step_rows, dist)]  # one share without torchrun
    mine = per_rank[dist.rank]
    loss_sum = torch.zeros((), device=args.torch_device)
    # Each forward/backward is a collective under FSDP2: a rank with fewer micro-batches runs
    # zero-weighted ones on a stand-in row until every rank has run as many.
    for k in range(max(map(len, per_rank))):
        weight = 1.0 if k < len(mine) else 0.0
        batch = collate(train, mine[k] if k < len(mine) else step_rows[:1], pad_id, args.torch_device)
        logp = response_logprobs(model, batch)  # [N] fp32
        loss = -logp.sum() * weight / n_targets
        loss.backward()
        loss_sum += loss.detach()
    return distributed.all_sum(float(loss_sum), dist), n_tokens, n_targets  # the step's one host sync


def apply_update(model, optimizer, loss_value, args, bad_steps, step):
    """Clip and step; a non-finite loss or gradient skips the update (BadSteps stops the run
    after --max-bad-steps in a row). Returns (grad norm before clipping, applied)."""
    grad_norm, finite = grad_norm_and_finite(model.parameters(), args.grad_clip)
    applied = bad_steps.record(finite and math.isfinite(loss_value), "step")
    if applied:
        optimizer.step()
    else:
        print(f"step {step}: non-finite loss ({loss_value}) or grad norm ({grad_norm}); "
              f"update skipped ({bad_steps.in_row} in a row)")
    optimizer.zero_grad()
    return grad_norm, applied


def log_step(run, progress, record, ev, total):
    """One metrics.jsonl record and one printed line."""
    if ev is not None:
        record.update(eval_fields(ev))
    run.log(record)
    line = (f"step {record['step']}/{total} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
            f"{fmt_count(record['tokens_per_s'])} tok/s | {fmt_count(record['tokens'])} tok")
    if "val_loss" in record:
        line += f" | val {record['val_loss']:.4f}"
    if "heldout_greedy" in record:
        line += f" | greedy {record['heldout_greedy']:.3f}"
    print(f"{line} | {progress.eta(record['step'])}", flush=True)


def finish(args, run, model, tokenizer, data, before, after, t_start, dist):
    """final/, then summary.json and the before/after table: did the training help?
    Under torchrun rank 0 writes final/ from the gathered weights (one tensor at a time)."""
    final = os.path.join(args.out, "final")
    weights = distributed.full_state_dict(model, dist)
    if dist.main:
        save_model(distributed.FullWeights(weights, model.config) if dist.on else model, final, tokenizer=tokenizer)
    del weights
    if after is None:  # resumed from the last step's checkpoint: measure now
        after = evaluate(model, data, args, tokenizer, dist)
    if not dist.main:
        return final
    summary = {"heldout_before": before, "heldout_after": after,
               "eval_problem_ids": [p.id for p in data.eval_problems], "final_model": final,
               "steps": run_steps(run), "time_s": round(time.time() - t_start, 1)}
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    print(before_after_table(before, after))
    print(f"saved {final} ({time.time() - t_start:.0f}s)")
    return final


def run_steps(run):
    with open(run.metrics_path, encoding="utf-8") as f:
        return max((json.loads(line).get("step", 0) for line in f if line.strip()), default=0)


# ---------------------------------------------------------------- main: setup, then the loop


def main(argv=None):
    args = parser.parse_args(argv)
    t_start = time.time()
    check_flags(args)
    dist = distributed.init(args.torch_device)  # one process without torchrun
    args.torch_device = dist.device
    distributed.quiet_unless_main(dist)
    tokenizer, config = load_tokenizer_and_config(args)
    resolve_defaults(args, config)
    data = load_data(args, tokenizer)
    plan = plan_steps(args, data.train)
    print(f"held out: {len(data.val)} examples, {len(data.eval_problems)} problems graded")
    run, ckpt = open_run(args, dist)
    model, optimizer, start_step, extra = build_model(args, config, ckpt, run, dist)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_ids[0]

    before = extra.get("before")
    if before is None:
        before = evaluate(model, data, args, tokenizer, dist)
        if eval_fields(before) and dist.main:
            run.log({"step": 0, **eval_fields(before)})
        print(f"held-out before training: {describe(before)}")
    bad_steps = BadSteps(args.max_bad_steps)
    bad_steps.in_row = extra.get("bad_in_row", 0)
    tokens_seen, after = extra.get("tokens", 0), None
    progress = Progress(plan.total, done=start_step)
    last_step = min(plan.total, start_step + args.stop_after) if args.stop_after else plan.total
    for step in range(start_step, last_step):
        t0 = time.time()
        epoch, j = plan.step_epoch[step]
        lr = lr_at(step, args.lr, args.warmup_steps, plan.total, args.lr_schedule, args.min_lr_ratio)
        optimizer.set_lr(lr)
        loss, n_tokens, n_targets = accumulate_gradients(model, data.train, plan.epochs[epoch][j], plan, args, pad_id,
                                                         dist)
        grad_norm, applied = apply_update(model, optimizer, loss, args, bad_steps, step + 1)
        tokens_seen += n_tokens
        done = step + 1
        record = {"step": done, "epoch": round(epoch + (j + 1) / len(plan.epochs[epoch]), 4), "loss": loss,
                  "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen, "step_tokens": n_tokens,
                  "step_response_tokens": n_targets, "tokens_per_s": n_tokens / (time.time() - t0),
                  "time_s": round(time.time() - t_start, 3)}
        if not applied:
            record["skipped"] = True
        if args.torch_device.type == "cuda":
            record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(args.torch_device) / 1e9, 3)
        ev = None
        if done == plan.total:
            ev = after = evaluate(model, data, args, tokenizer, dist)
        elif args.eval_every and done % args.eval_every == 0:
            ev = evaluate(model, data, args, tokenizer, dist, accuracy=False)
        if dist.main:
            log_step(run, progress, record, ev, plan.total)
        extra = {"tokens": tokens_seen, "bad_in_row": bad_steps.in_row, "before": before}
        if done in (plan.total, last_step) or (args.save_every and done % args.save_every == 0):
            if dist.on:  # every rank writes its shards
                distributed.save_checkpoint(run, done, model, optimizer, tokenizer, dist, extra, args.keep_last)
            else:
                run.save_checkpoint(done, model, tokenizer, optimizer, extra=extra, keep_last=args.keep_last)

    if last_step < plan.total:
        print(f"stopped after step {last_step} (--stop-after); continue with --resume --out {args.out}")
        final = None
    else:
        final = finish(args, run, model, tokenizer, data, before, after, t_start, dist)
    distributed.close(dist)
    return final


if __name__ == "__main__":
    run_main(main)
