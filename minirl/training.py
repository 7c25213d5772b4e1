"""What both training scripts share: the optimizer with fp32 master weights, the learning
rate schedule, the run folder (resolved arguments, metrics.jsonl, checkpoints with exact
resume), and the entry-script error convention.

Why fp32 master weights: with bf16 weights an AdamW update of lr 1e-6 (the papers' rate) is
far below bf16's resolution (~4e-3 relative) and would be rounded away. The model keeps its
compute dtype; the optimizer keeps an fp32 copy, steps it, and copies it back. For fp32 models
(CPU) the parameters are stepped directly.

Exact resume: all randomness in the loops comes from generators seeded by (seed, step), and
the data order by (seed, epoch), so a checkpoint needs only the step, the optimizer (with the
master weights) and the weights themselves.
"""
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile

import torch

from minirl.checkpoint import load_model, read_config, read_safetensors_header, save_model, weight_files
from minirl.common import (AtomicDir, MinirlError, TrainingDiverged, atomic_write_json, atomic_write_text,
                           check_writable_dir, read_jsonl)

# ---------------------------------------------------------------- optimizer


class MasterAdamW:
    """AdamW on fp32 copies of the parameters; the model's (bf16) parameters get the result.

    Interface of a torch optimizer where the loops need it: step(), zero_grad(),
    state_dict(), load_state_dict(), param_groups (for the learning rate).

    The update is torch's fused AdamW (one kernel over all tensors) on CUDA and on CPU alike:
    it computes the same update as the per-tensor loop (equal within fp32 rounding) and on
    CPU takes about a sixth of its time (SmolLM2-135M, one thread: 0.08 s vs 0.5 s).
    Parameters spread over several device types fall back to torch's default."""

    def __init__(self, params, lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.needs_master = any(p.dtype != torch.float32 for p in self.params)
        if self.needs_master:
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        else:
            self.master = self.params
        # No weight decay on norms and biases (1-D), as in nanoGPT / TRL defaults.
        decay = [m for m, p in zip(self.master, self.params) if p.dim() >= 2]
        no_decay = [m for m, p in zip(self.master, self.params) if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        device_types = {p.device.type for p in self.params}
        self.fused = True if len(device_types) == 1 and device_types <= {"cpu", "cuda"} else None
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=self.fused)

    @property
    def param_groups(self):
        return self.opt.param_groups

    def set_lr(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self):
        if self.needs_master:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        if self.needs_master:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)  # round to nearest: p == m.to(p.dtype)

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        if self.needs_master:
            for m in self.master:
                m.grad = None

    def state_dict(self):
        sd = {"opt": self.opt.state_dict()}
        if self.needs_master:
            sd["master"] = [m.detach().cpu() for m in self.master]
        return sd

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd["opt"])
        # A checkpoint written before the fused path carries fused=None in its groups: keep
        # this optimizer's choice (the update is the same, only faster).
        # (fused keeps its step counters as fp32 tensors on the parameters' device.)
        for g in self.opt.param_groups:
            g["fused"] = self.fused
            if self.fused:
                g["foreach"] = None
                for m in g["params"]:
                    st = self.opt.state.get(m, {})
                    if "step" in st:
                        st["step"] = st["step"].to(device=m.device, dtype=torch.float32)
        if self.needs_master:
            with torch.no_grad():
                for m, p, saved in zip(self.master, self.params, sd["master"]):
                    m.copy_(saved)
                    p.copy_(saved)


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
          min_lr_ratio: float = 0.0) -> float:
    """Linear warmup over `warmup_steps` (step counts from 0), then constant, cosine or linear
    decay to lr * min_lr_ratio at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - progress
    else:
        raise MinirlError(f"--lr-schedule: unknown schedule {schedule!r} (constant, cosine, linear)")
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * factor)


def grad_norm_and_finite(params, max_norm: float):
    """Clip to max_norm (if > 0) and return (total norm, all finite)."""
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
    norm = float(norm)
    return norm, math.isfinite(norm)


def use_gradient_checkpointing(flag: str, device) -> bool:
    """--gradient-checkpointing on | off | auto (auto = on for CUDA, where activations are
    what limits the batch; off on CPU, where the recompute only costs time)."""
    return flag == "on" or (flag == "auto" and torch.device(device).type == "cuda")


# ---------------------------------------------------------------- run folder


def check_out_dir(out: str, resume: bool, flag: str = "--out"):
    """The one run-folder rule of the training scripts, checked before any work: a folder
    that already holds a run is continued with --resume and refused without it (two runs
    never mix in one folder); a folder that cannot be created or written is refused (by
    trying, not by asking os.access, which says yes to root even under /proc)."""
    if not resume and holds_run(out):
        raise MinirlError(f"{flag} {out}: already holds a run; pass --resume to continue it "
                          "or choose another folder")
    check_writable_dir(out, flag)


def holds_run(folder: str) -> bool:
    """Whether a run has started in `folder` (any of the files a run writes is there)."""
    ckpts = os.path.join(folder, "checkpoints")
    return (any(os.path.exists(os.path.join(folder, name)) for name in ("metrics.jsonl", "args.json", "final"))
            or os.path.isdir(ckpts) and any(CHECKPOINT_NAME.match(n) for n in os.listdir(ckpts)))


CHECKPOINT_NAME = re.compile(r"step_(\d+)$")
MANIFEST = "manifest.json"  # written last into a checkpoint: the names and sizes of its files


class RunDir:
    """runs/NAME/: args.json, metrics.jsonl, checkpoints/step_NNNNNN/ (model/ as an HF folder,
    trainer_state.pt, manifest.json). See docs/runs.md."""

    def __init__(self, path):
        self.path = str(path)
        self.ckpt_root = os.path.join(self.path, "checkpoints")
        os.makedirs(self.ckpt_root, exist_ok=True)
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self._wandb = None
        self._tb = None

    def save_args(self, args: dict):
        atomic_write_json(os.path.join(self.path, "args.json"), args)

    def enable_loggers(self, wandb_project=None, tensorboard=False, run_name=None, config=None):
        """Optional extra sinks; each needs its package (wandb / tensorboard)."""
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise MinirlError("--wandb-project: the wandb package is not installed") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MinirlError("--tensorboard: the tensorboard package is not installed") from None
            self._tb = SummaryWriter(os.path.join(self.path, "tb"))

    def log(self, record: dict):
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: a kill tears at most the last
        step = record.get("step")
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def truncate_metrics(self, after_step: int) -> list:
        """On resume: drop metric lines written after the checkpoint (the run repeats them),
        and a torn last line (a write cut short by a kill). Returns notes for the user
        (empty when nothing unusual was dropped). A bad line before the last is an error."""
        if not os.path.exists(self.metrics_path):
            return []
        lines = list(read_jsonl(self.metrics_path, torn_tail=True))
        with open(self.metrics_path, "rb") as f:
            total = sum(1 for ln in f if ln.strip())
        keep = [obj for _, obj in lines if obj.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(obj) + "\n" for obj in keep))
        torn = total - len(lines)
        return [f"{self.metrics_path}: dropped a torn last line (a write cut short)"] if torn else []

    def checkpoints(self) -> list:
        """The checkpoint folders step_NNNNNN, oldest first (leftover .tmp-* folders excluded)."""
        found = [e.path for e in os.scandir(self.ckpt_root) if e.is_dir() and CHECKPOINT_NAME.match(e.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(os.path.basename(p)).group(1)))

    def resume_checkpoint(self):
        """(checkpoint folder or None, notes): what --resume continues from. Call once, when a
        resumed run starts (never while another process may be saving into this folder).

        Removes the .tmp-* files and folders an interrupted save left behind (in the run
        folder and in checkpoints/: a killed save of final/ leaves a whole model), then takes the newest
        checkpoint that verify_checkpoint accepts; each damaged one skipped gets a note, e.g.
        "checkpoint step_000006 is damaged (...); resuming from step_000004". The notes are
        for the entry script to print. Raises MinirlError when checkpoints exist but every
        one is damaged (starting over silently would hide it)."""
        notes = []
        leftovers = sorted(e.path for folder in (self.path, self.ckpt_root) for e in os.scandir(folder)
                           if e.name.startswith(".tmp-"))
        for path in leftovers:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        if leftovers:
            notes.append(f"removed {len(leftovers)} unfinished file(s) left by an interrupted save ("
                         + ", ".join(os.path.relpath(p, self.path) for p in leftovers) + ")")
        damaged = []
        for ckpt in reversed(self.checkpoints()):
            problem = verify_checkpoint(ckpt)
            if problem is None:
                for name, why in damaged:
                    notes.append(f"checkpoint {name} is damaged ({why}); resuming from {os.path.basename(ckpt)}")
                return ckpt, notes
            damaged.append((os.path.basename(ckpt), problem))
        if damaged:
            raise MinirlError(f"--resume: every checkpoint in {self.ckpt_root} is damaged ("
                              + "; ".join(f"{n}: {why}" for n, why in damaged)
                              + "); remove them to start the run over, or use another --out")
        return None, notes

    def latest_checkpoint(self):
        """The folder of resume_checkpoint() without its notes (call only when resuming)."""
        return self.resume_checkpoint()[0]

    def save_checkpoint(self, step: int, model, tokenizer, optimizer, extra: dict = None, keep_last: int = 2):
        """Atomic: the folder appears complete or not at all. Refuses non-finite weights.
        manifest.json is written last; resume checks every file against it."""
        out = os.path.join(self.ckpt_root, f"step_{step:06d}")
        with AtomicDir(out) as tmp:
            save_model(model, os.path.join(tmp, "model"), tokenizer=tokenizer)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "extra": extra or {}},
                       os.path.join(tmp, "trainer_state.pt"))
            write_manifest(tmp, step)
        if keep_last and keep_last > 0:
            for old in self.checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return out


def write_manifest(folder: str, step: int):
    """manifest.json: every file's size, and each safetensors file's header length."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            entry = {"size": os.path.getsize(path)}
            if name.endswith(".safetensors"):
                with open(path, "rb") as f:
                    entry["header_bytes"] = int.from_bytes(f.read(8), "little")
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = entry
    atomic_write_json(os.path.join(folder, MANIFEST), {"step": step, "files": files})


def verify_checkpoint(ckpt_dir: str):
    """None if the checkpoint is complete, else what is wrong, in a few words.

    Checks what a kill, a full disk or a power cut leaves (missing, truncated or zeroed
    files), not bit-level corruption: every file in manifest.json is present with its size,
    each safetensors file starts with its recorded header length, the header parses and its
    tensors fit in the file, config.json parses and
    trainer_state.pt's zip directory (at the end of the file) reads. Checkpoints written
    before manifests existed get the same checks without the size list. Reads no weights."""
    state_path = os.path.join(ckpt_dir, "trainer_state.pt")
    manifest_path = os.path.join(ckpt_dir, MANIFEST)
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                listed = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} unreadable"
        for rel, entry in listed.items():
            path = os.path.join(ckpt_dir, rel)
            if not os.path.exists(path):
                return f"{rel} missing"
            size = os.path.getsize(path)
            if size != entry.get("size"):
                return f"{rel} {'truncated' if size < entry.get('size', 0) else 'has the wrong size'}: " \
                       f"{size} of {entry.get('size')} bytes"
            if "header_bytes" in entry:
                with open(path, "rb") as f:
                    if int.from_bytes(f.read(8), "little") != entry["header_bytes"]:
                        return f"{rel} does not start with the header it was written with"
    elif not os.path.exists(state_path):
        return "trainer_state.pt missing"
    model_dir = os.path.join(ckpt_dir, "model")
    sharded = os.path.exists(os.path.join(ckpt_dir, ".metadata"))  # DCP (minirl.distributed): no weights in model/
    try:
        read_config(model_dir)
        for path in [] if sharded else weight_files(model_dir):
            read_safetensors_header(path)
    except MinirlError as e:
        return str(e).replace(ckpt_dir + os.sep, "")
    try:
        with zipfile.ZipFile(state_path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"trainer_state.pt unreadable ({e})"
    return None


def load_checkpoint(ckpt_dir: str, device, dtype):
    """(model, trainer_state) from a checkpoint folder; state loaded with weights_only=True.
    A damaged file is a MinirlError naming it, never a traceback."""
    state_path = os.path.join(ckpt_dir, "trainer_state.pt")
    if not os.path.exists(state_path):
        raise MinirlError(f"{state_path}: not found (incomplete checkpoint?)")
    model = load_model(os.path.join(ckpt_dir, "model"), device=device, dtype=dtype)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # PytorchStreamReader, unpickling, zip errors: the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinirlError(f"{state_path}: damaged trainer state ({first}); resume from an "
                          "earlier checkpoint by removing this one") from None
    return model, state


# ---------------------------------------------------------------- entry scripts


def run_main(main):
    """Run an entry script's main(): a MinirlError becomes one line on stderr and exit 2,
    a TrainingDiverged (non-finite updates) one line and exit 1."""
    try:
        main()
    except MinirlError as e:
        _say_once(e)
        sys.exit(2)
    except TrainingDiverged as e:
        _say_once(e)
        sys.exit(1)


def _say_once(error):
    """Under torchrun every rank fails alike: rank 0 prints the line; the others wait a
    moment before exiting, since torchrun stops every rank as soon as one exits."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)


class BadSteps:
    """The one policy for non-finite updates, shared by both training scripts: the update is
    skipped (gradients dropped), and after `limit` skipped updates in a row the run stops
    with TrainingDiverged (the last checkpoint is kept)."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def record(self, finite: bool, what: str = "update") -> bool:
        """Count one update; True if it may be applied. Raises after `limit` bad in a row."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise TrainingDiverged(f"{self.in_row} {what}s in a row with a non-finite loss or gradient "
                                   f"(--max-bad-steps {self.limit}); the last checkpoint is kept; "
                                   "lower --lr or check the data")
        return False


def check_resume_args(saved: dict, current: dict, may_change, path: str):
    """The one resume rule for both scripts: every setting in args.json must equal this
    invocation's, except those in `may_change` (where to log, how long to run, the device)."""
    changed = [k for k, v in current.items() if k not in may_change and k in saved and saved[k] != v]
    if changed:
        k = changed[0]
        raise MinirlError(f"--resume: --{k.replace('_', '-')} is {current[k]!r} but the run in "
                          f"{path} used {saved[k]!r}; resume with the same value"
                          + (f" (also differ: {', '.join('--' + c.replace('_', '-') for c in changed[1:])})"
                             if len(changed) > 1 else ""))


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Elapsed time and ETA for a loop of known length (entry scripts print it).

    The ETA uses the median of the last `window` step times, not the mean since the start:
    the first step (warm-up, compilation) and an occasional slow one (an evaluation, a
    checkpoint) do not throw it off, and it follows a real change of pace within a window."""

    def __init__(self, total: int, done: int = 0, window: int = 10):
        self.total, self.start_done, self.window = total, done, window
        self.t0 = self.t_last = time.time()
        self.done_last, self.step_times = done, []

    def eta(self, done: int) -> str:
        now = time.time()
        if done > self.done_last:
            per_step = (now - self.t_last) / (done - self.done_last)
            self.step_times = (self.step_times + [per_step] * min(done - self.done_last, self.window))[-self.window:]
            self.t_last, self.done_last = now, done
        elapsed = now - self.t0
        if not self.step_times:
            return f"{format_duration(elapsed)} elapsed, ETA ?"
        median = sorted(self.step_times)[len(self.step_times) // 2]
        return f"{format_duration(elapsed)} elapsed, ETA {format_duration(median * (self.total - done))}"
