"""Token log-probs, entropies and the GRPO per-token loss: the checked public entry points.
Each checks its inputs (raising MinirlError), then calls kernels/ops.py, which chooses the
backend (Triton kernels or their PyTorch references) and runs the custom op.

    token_logprobs(logits [N, V], targets [N])              -> logprob [N] (, entropy [N])
    linear_logprobs(hidden [N, H], weight [V, H], targets)  -> logprob [N] (, entropy [N])
    grpo_token_loss(logp [N, T], old_logp, advantages, mask, ...)
                                                  -> (loss [N, T], stats dict)

logprob[n] = log softmax(logits[n])[targets[n]] and entropy[n] = -sum_j p_j log p_j, both fp32
(softmax maths is always fp32, whatever the logits' dtype). Leading dimensions are allowed:
logits [B, T, V] with targets [B, T] give [B, T] outputs, and likewise for hidden. The GRPO
per-token loss is the formula in minirl/grpo.py's module docstring.

backend=None / "auto" / "triton" / "torch" and the environment variable MINIRL_KERNELS are
resolved by kernels.ops.resolve_backend (its docstring gives the rule). triton is imported
only when the Triton backend is used, so this module imports where triton is not installed.

Cost of the checks: targets are checked to lie in [0, V) before any kernel reads
logits[n, targets[n]] (the kernels do not bounds-check that load). That is one reduction over
N integers and one host-device synchronisation (a few microseconds plus the wait for queued
GPU work) per call; the torch path does the same check so that both raise the same error.
Under torch.compile and on fake tensors (FakeTensorMode) that value check is skipped: it
needs the data; the shape, dtype and device checks still run.
"""
import torch

from minirl.common import MinirlError
from minirl.kernels import ops
from minirl.kernels.reference import KL_ESTIMATORS, token_stats

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _has_data(t) -> bool:
    """False while tracing (torch.compile) or on fake tensors: no values to check."""
    from torch._subclasses.fake_tensor import is_fake
    return not (torch.compiler.is_compiling() or is_fake(t))


def _check_targets(targets, expected_shape, vocab, name="targets"):
    if targets.dtype not in (torch.int64, torch.int32):
        raise MinirlError(f"{name} must be int64 or int32, got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise MinirlError(f"{name} has shape {tuple(targets.shape)}, expected "
                          f"{tuple(expected_shape)}")
    if targets.numel() and _has_data(targets) and bool(((targets < 0) | (targets >= vocab)).any()):  # host sync
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise MinirlError(f"{name} holds {bad}, outside the vocabulary [0, {vocab})")


def token_logprobs(logits, targets, return_entropy=False, backend=None):
    """log p(targets) under softmax(logits): logits [..., V] (bf16/fp16/fp32; fp64 with the
    torch backend), targets [...] int -> logprob [...] fp32 (, entropy [...] fp32).

    Differentiable with respect to logits (through both outputs). The Triton backend keeps
    no fp32 copy of the logits and returns their gradient in their dtype."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise MinirlError("logits must be a tensor [..., V]")
    if not logits.is_floating_point():
        raise MinirlError(f"logits must be floating point, got {logits.dtype}")
    V = logits.shape[-1]
    if V == 0:
        raise MinirlError("logits have an empty vocabulary dimension")
    if targets.device != logits.device:
        raise MinirlError(f"targets are on {targets.device} but logits on {logits.device}")
    lead = logits.shape[:-1]
    _check_targets(targets, lead, V)

    if ops.resolve_backend(backend, logits.device) == "triton" and logits.dtype not in _KERNEL_DTYPES:
        raise MinirlError(f"the Triton kernel takes bf16, fp16 or fp32 logits, got "
                          f"{logits.dtype} (use backend='torch')")
    logits2d = logits.reshape(-1, V)  # [N, V]; a view whenever the rows are evenly strided
    if logits2d.stride(-1) != 1:  # the kernels need contiguous rows; rows may be strided
        logits2d = logits2d.contiguous()
    out = ops.token_logprobs(logits2d, targets.reshape(-1).contiguous(), return_entropy, backend)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def linear_logprobs(hidden, weight, targets, return_entropy=False, chunk_size=None,
                    backend=None):
    """log p(targets) under softmax(hidden @ weight.T), without the full logits.

    hidden [..., H] and weight [V, H] (same dtype and device), targets [...] int ->
    logprob [...] fp32 (, entropy [...] fp32); gradients flow to hidden and weight. Tokens
    are processed `chunk_size` rows at a time (default: kernels.linear_logprobs.
    default_chunk_size, about 2^26 logits per chunk on GPU, 2^24 on CPU), so memory grows
    with chunk_size x V. Both backends chunk; they differ only in the per-chunk softmax
    maths (Triton kernel 1 or torch). The result does not depend on chunk_size beyond
    rounding."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise MinirlError("hidden must be a tensor [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise MinirlError("weight must be the lm-head matrix [V, H]")
    if hidden.shape[-1] != weight.shape[1]:
        raise MinirlError(f"hidden has size {hidden.shape[-1]} but weight [V, H] has "
                          f"H={weight.shape[1]}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise MinirlError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
                          "one floating dtype")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise MinirlError(f"hidden ({hidden.device}), weight ({weight.device}) and targets "
                          f"({targets.device}) must be on one device")
    V = weight.shape[0]
    if V == 0:
        raise MinirlError("weight has an empty vocabulary dimension")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise MinirlError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    lead = hidden.shape[:-1]
    _check_targets(targets, lead, V)

    if ops.resolve_backend(backend, hidden.device) == "triton" and hidden.dtype not in _KERNEL_DTYPES:
        raise MinirlError(f"the Triton kernel takes bf16, fp16 or fp32, got {hidden.dtype} "
                          "(use backend='torch')")
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # [N, H]; copy only if needed
    targets1d = targets.reshape(-1).contiguous()  # [N]
    out = ops.linear_logprobs(hidden2d, weight, targets1d, return_entropy, chunk_size, backend)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def grpo_token_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, ref_logp=None,
                    beta=0.0, kl_estimator="k3", backend=None):
    """GRPO per-token loss: clipped surrogate (asymmetric clip) + beta * KL to a reference,
    the formula in minirl/grpo.py's module docstring (kl_estimator "k1" | "k2" | "k3").

    logp [N, T] (the policy's log-probs, differentiable), old_logp [N, T] (the sampling
    policy's), advantages [N] (one per sequence) or [N, T], mask [N, T] (nonzero = a real
    completion token, 0 = padding: loss 0), ref_logp [N, T] or None.

    Returns (loss [N, T] fp32, stats) where stats holds 0-dim fp32 tensors (no host sync)
    computed over the unmasked tokens (A the advantage, r = exp(logp - old_logp)):
        clip_low_frac   fraction with A < 0 and r < 1 - eps_low (gradient zeroed by the clip)
        clip_high_frac  fraction with A > 0 and r > 1 + eps_high (likewise)
        clip_frac       their sum
        ratio_mean, ratio_min, ratio_max   of r (1.0 when no token is unmasked)
        kl_mean         mean KL estimate (0 without ref_logp); logged even when beta = 0
        n_tokens        number of unmasked tokens
    Gradients flow to logp only. How the per-token loss is aggregated is minirl.grpo.aggregate."""
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise MinirlError(f"{name} must be a tensor [N, T]")
        if not x.is_floating_point():
            raise MinirlError(f"{name} must be floating point, got {x.dtype}")
    shape = tuple(logp.shape)
    if tuple(old_logp.shape) != shape or tuple(mask.shape) != shape:
        raise MinirlError(f"logp {shape}, old_logp {tuple(old_logp.shape)} and mask "
                          f"{tuple(mask.shape)} must have one shape [N, T]")
    if not advantages.is_floating_point():
        raise MinirlError(f"advantages must be floating point, got {advantages.dtype}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages.unsqueeze(1).expand(shape)  # [N] -> [N, T]
    if tuple(advantages.shape) != shape:
        raise MinirlError(f"advantages have shape {tuple(advantages.shape)}; expected "
                          f"[{shape[0]}] or {list(shape)}")
    if ref_logp is not None:
        if not ref_logp.is_floating_point() or tuple(ref_logp.shape) != shape:
            raise MinirlError(f"ref_logp must be floating point with shape {list(shape)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise MinirlError(f"kl_estimator={kl_estimator!r}: choose one of {KL_ESTIMATORS}")
    if beta < 0 or eps_low < 0 or eps_high < 0:
        raise MinirlError(f"beta ({beta}), eps_low ({eps_low}) and eps_high ({eps_high}) "
                          "must be >= 0")
    if eps_low >= 1:
        raise MinirlError(f"eps_low={eps_low} must be < 1 (the ratio is positive)")
    if beta > 0 and ref_logp is None:
        raise MinirlError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs)")
    tensors = [logp, old_logp, advantages, mask] + ([ref_logp] if ref_logp is not None else [])
    if any(t.device != logp.device for t in tensors):
        raise MinirlError("logp, old_logp, advantages, mask and ref_logp must be on one device")
    mask = mask if mask.dtype == torch.bool else mask != 0  # [N, T] bool

    def f32(x):  # the kernel reads contiguous fp32 [N, T]; these are small
        return None if x is None else x.to(torch.float32).contiguous()

    loss, ratio, kl, clipped = ops.grpo_token_loss(f32(logp), f32(old_logp), f32(advantages),
                                                   mask.contiguous(), eps_low, eps_high, f32(ref_logp),
                                                   beta, kl_estimator, backend)
    return loss, token_stats(mask, ratio, kl, clipped)
