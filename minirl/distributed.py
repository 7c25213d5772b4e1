"""More than one process: torchrun + torch.distributed + FSDP2, in one place.

The training and evaluation scripts run unchanged on one process; under `torchrun` they call
the few functions below, and nothing else about them changes:

    dist = distributed.init(device_flag)      # rank, world size, device; no-op without torchrun
    distributed.quiet_unless_main(dist)       # ranks > 0 print nothing
    model = distributed.shard(model, dist, compute_dtype)   # FSDP2: params/grads/optim 1/N each
    mine = distributed.split(items, dist)     # this rank's share, by a fixed rule
    everyone = distributed.gather(mine, dist) # every rank's share, in rank order (merge() undoes split)
    total = distributed.all_sum(x, dist)      # a float summed over ranks
    value = distributed.from_main(fn, dist)   # fn() run by rank 0 alone, sent to all
    plain = distributed.replica(model, dist, dtype)      # full weights on every rank (for sampling)
    distributed.save_checkpoint(run, step, ...) / load_checkpoint(ckpt, ...)  # sharded (DCP)
    weights = distributed.full_state_dict(model, dist)   # rank 0, for final/

Without torchrun each of them is the identity or a no-op, so the scripts' one-process path
is unchanged.

Sharding (FSDP2, `torch.distributed.fsdp.fully_shard`): every transformer block is one
group, the embeddings/final norm/lm-head the root group. Parameters stay fp32 and sharded
(they are the master weights, 1/N per rank, and AdamW's state is sharded with them); compute
runs in `compute_dtype` (bf16 on GPU) and gradients are reduced in fp32. Gradients are
*summed* over ranks (divide factor 1), not averaged: the losses already divide by global
denominators (sequences, tokens of the whole batch), so the N-rank gradient is the 1-rank
gradient up to the order of the floating-point additions.

Failure: collectives time out after MINIRL_DIST_TIMEOUT seconds (default 600), so a rank that
dies makes the others fail instead of waiting forever; torchrun then stops the job.
"""
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes shared files."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device=None) -> Dist:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on CPU); else the
    single-process Dist. `device`: the --device flag (None: cuda if available, else cpu)."""
    from minirl.common import default_device
    device = torch.device(device) if device else default_device()
    if not launched_by_torchrun():
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("MINIRL_DIST_TIMEOUT", 600)))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank, world, local_rank, device)


def quiet_unless_main(dist: Dist):
    """Ranks other than 0 print nothing (their stdout goes to /dev/null): the entry scripts'
    progress lines appear once. Errors still reach stderr from every rank."""
    if not dist.main:
        sys.stdout = open(os.devnull, "w")


def close(dist: Dist):
    if dist.on and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard(model, dist: Dist, compute_dtype=None):
    """FSDP2 over the ranks (see the module docstring). The model must hold fp32 weights."""
    if not dist.on:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for m in [*model.model.layers, model]:
        m.set_gradient_divide_factor(1.0)  # sum, not mean: the loss denominators are global
        m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return model


def split(items, dist: Dist):
    """This rank's share of a list: items rank, rank + N, rank + 2N, ... (a fixed rule that
    balances lengths to within one item)."""
    return items[dist.rank::dist.world]


def merge(shares):
    """Undo split(): the per-rank lists (in rank order) back into the original order."""
    out, world = [], len(shares)
    for i in range(sum(len(s) for s in shares)):
        out.append(shares[i % world][i // world])
    return out


def shares(items, dist: Dist) -> list:
    """Every rank's split() of `items`, in rank order (each rank can compute them all: the
    rule is fixed, so nothing is sent)."""
    return [items[r::dist.world] for r in range(dist.world)]


def from_main(fn, dist: Dist):
    """fn() computed by rank 0 alone (e.g. a decision that touches files), sent to every rank."""
    if not dist.on:
        return fn()
    box = [fn() if dist.main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, dist: Dist) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not dist.on:
        return [obj]
    out = [None] * dist.world
    torch_dist.all_gather_object(out, obj)
    return out


def all_sum(value: float, dist: Dist) -> float:
    """A number summed over the ranks (float64 on the wire)."""
    if not dist.on:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t)
    return float(t.item())


def barrier(dist: Dist):
    if dist.on:
        torch_dist.barrier()


def local_bytes(module) -> int:
    """Bytes of the parameters held by this rank (its shards under FSDP2)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def full_state_dict(model, dist: Dist) -> dict:
    """The whole model's state dict on rank 0, on CPU (other ranks get {}): gathered one
    tensor at a time, so rank 0 never holds more than one extra copy of the weights."""
    if not dist.on:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class FullWeights:
    """A full state dict with its config: what checkpoint.save_model needs from a model
    (state_dict() and .config), so rank 0 writes an HF folder without building a second model."""

    def __init__(self, state: dict, config):
        self.state, self.config = state, config

    def state_dict(self):
        return self.state


def replica(model, dist: Dist, dtype=None):
    """A plain (unsharded) copy of a sharded model on every rank, in `dtype`, for work that
    would otherwise all-gather the weights at every call (sampling: one forward per token).
    Costs one full copy of the weights per rank while it lives. Without torchrun: the model."""
    if not dist.on:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from minirl.model import Transformer, rope_inverse_frequencies
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}
    with torch.device("meta"):
        copy = Transformer(model.config)
    copy.load_state_dict(state, assign=True, strict=True)
    copy.inv_freq = rope_inverse_frequencies(model.config).to(dist.device)
    return copy.eval()


def save_sharded(path: str, model, optimizer, dist: Dist, extra: dict = None, write_more=None):
    """Every rank writes its shards of the weights and of AdamW's state with
    torch.distributed.checkpoint (DCP) into `path`, atomically: into a temporary folder
    (.tmp-<name> beside it) that rank 0 renames once all ranks are done, so a partial
    checkpoint is never picked up. `extra` (JSON-able, e.g. the step and data position) is
    written by rank 0 as extra.json; `write_more(tmp_folder)`, if given, runs on rank 0 before
    the rename (e.g. the config, a manifest). `optimizer` is a torch optimizer (MasterAdamW's .opt)."""
    import json
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from minirl.common import settle_tree
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(dist)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    barrier(dist)
    if dist.main:
        with open(os.path.join(tmp, "extra.json"), "w", encoding="utf-8") as f:
            json.dump(extra or {}, f)
        if write_more is not None:
            write_more(tmp)
        settle_tree(tmp)  # the umask's modes, as every other output
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier(dist)


def load_sharded(path: str, model, optimizer, dist: Dist) -> dict:
    """Load a save_sharded() checkpoint into this run's model and optimizer, whatever the
    number of ranks that wrote it (DCP reshards). Returns its `extra` dict."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "extra.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- run-folder checkpoints


def is_sharded_checkpoint(ckpt) -> bool:
    """Whether a checkpoint folder was written by save_checkpoint (DCP shards)."""
    return ckpt is not None and os.path.exists(os.path.join(ckpt, ".metadata"))


def save_checkpoint(run, step: int, model, optimizer, tokenizer, dist: Dist, extra: dict, keep_last: int):
    """The sharded counterpart of RunDir.save_checkpoint: checkpoints/step_N with every
    rank's DCP shards of the weights and AdamW state, model/ (config and tokenizer, no
    weights), trainer_state.pt (step, the loop's extra state, number of ranks) and
    manifest.json last (so RunDir.resume_checkpoint verifies it like any other), renamed into
    place by rank 0 once complete. `optimizer`: a MasterAdamW over the sharded parameters."""
    import json

    from minirl.training import write_manifest

    def write_more(tmp):
        os.makedirs(os.path.join(tmp, "model"))
        with open(os.path.join(tmp, "model", "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_hf(), f, indent=2)
        tokenizer.save(os.path.join(tmp, "model"))
        torch.save({"step": step, "extra": extra, "world": dist.world}, os.path.join(tmp, "trainer_state.pt"))
        write_manifest(tmp, step)

    path = os.path.join(run.ckpt_root, f"step_{step:06d}")
    save_sharded(path, model, optimizer.opt, dist, write_more=write_more)
    if dist.main and keep_last:
        import shutil
        for old in run.checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: str, model, optimizer, dist: Dist):
    """Load a save_checkpoint() folder into this run's (sharded) model and MasterAdamW.
    Returns (trainer state: step and extra, a note: "" or how it was resharded)."""
    if not is_sharded_checkpoint(ckpt):
        return load_single_process_checkpoint(ckpt, model, optimizer, dist)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)
    load_sharded(ckpt, model, optimizer.opt, dist)
    note = (f"; resharded from {state['world']} to {dist.world} rank(s)" if state["world"] != dist.world else "")
    return state, note


def load_single_process_checkpoint(ckpt: str, model, optimizer, dist: Dist):
    """A checkpoint written by one process (RunDir.save_checkpoint: model/ + trainer_state.pt)
    into this run's sharded model and optimizer: the full weights (the fp32 master copy when
    there is one) and AdamW's state, named by parameter, scattered to the ranks' shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from minirl.training import load_checkpoint as load_plain_checkpoint
    plain, state = load_plain_checkpoint(ckpt, "cpu", torch.float32)
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    weights = plain.state_dict()
    if "master" in state["optimizer"]:  # bf16 weights + fp32 masters: the masters are the weights
        weights.update(zip(names, state["optimizer"]["master"]))
    del plain
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    # MasterAdamW's groups: matrices (weight decay) first, then vectors, each in module order.
    dims = {n: weights[n].dim() for n in names}
    order = [n for n in names if dims[n] >= 2] + [n for n in names if dims[n] < 2]
    saved = state["optimizer"]["opt"]
    groups, start = [], 0
    for g in saved["param_groups"]:
        groups.append({**g, "params": order[start:start + len(g["params"])]})
        start += len(g["params"])
    full = {"state": {order[i]: v for i, v in saved["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer.opt, full, options=options)
    return {"step": state["step"], "extra": state.get("extra", {})}, f"; resharded from 1 to {dist.world} rank(s)"
