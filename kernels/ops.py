"""The one place that chooses a backend, and the kernels as torch custom ops.

Backend rule (resolve_backend): backend=None or "auto" uses Triton when the tensors are on
CUDA (and triton is installed), the PyTorch reference elsewhere; the environment variable
MINIRL_KERNELS=triton|torch|auto replaces "auto"; backend="triton" or "torch" forces one.
Triton on CPU tensors runs only under the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported), which the tests use.

Custom ops (torch.library.custom_op), each with a fake implementation (output shapes and
dtypes from the inputs', so a step traces under FakeTensorMode and torch.compile keeps the
op as one opaque node) and its autograd registered:

    minirl::token_logprobs(logits [N, V], targets [N], with_entropy, use_triton)
        -> logprob [N], entropy [N] (or [0]), lse [N]             backward: ..._backward
    minirl::linear_logprobs(hidden [N, H], weight [V, H], targets [N], with_entropy,
                            chunk_size, use_triton)
        -> logprob [N], entropy [N] (or [0]), lse [N]             backward: ..._backward
    minirl::grpo_token_loss(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta,
                            kl_estimator)          (all [N, T]; the Triton kernel only)
        -> loss, dlogp, ratio, kl, clipped                        backward: g * dlogp

use_triton=True runs kernels 1 and 2 with Triton, False their PyTorch versions
(kernels/reference.py): the same op on every device. The GRPO loss has no PyTorch body in
an op: without Triton, grpo_token_loss below runs kernels.reference.grpo_token_loss_reference
through autograd, plain torch ops that torch.compile traces (and fuses) itself.

The functions at the end (token_logprobs, linear_logprobs, grpo_token_loss) take a backend
name, resolve it and call the op; they do not check their inputs (minirl.losses does, then
calls them; minirl.grpo calls them directly on tensors it built). Nothing here imports
triton at import time.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from minirl.common import MinirlError
from minirl.kernels.linear_logprobs import chunked_backward, chunked_forward, default_chunk_size
from minirl.kernels.reference import (compute_dtype, grpo_token_loss_reference, logprobs_bwd_torch_,
                                      logprobs_fwd_torch)

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend, device) -> str:
    """'triton' or 'torch' for tensors on `device` (see the module docstring)."""
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise MinirlError(f"backend={backend!r}: choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("MINIRL_KERNELS", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise MinirlError(f"environment variable MINIRL_KERNELS={backend!r}: "
                              f"choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise MinirlError("backend='triton' (or MINIRL_KERNELS=triton) but triton is not "
                              "installed; use backend='torch'")
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if torch.device(device).type != "cuda" and not interpreting:
            raise MinirlError(f"backend='triton' needs CUDA tensors (got {device}); set "
                              "TRITON_INTERPRET=1 before importing triton to run the "
                              "kernels on CPU (slowly), or use backend='torch'")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------
# minirl::token_logprobs (kernel 1)
# --------------------------------------------------------------------------------------

@torch.library.custom_op("minirl::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, targets: Tensor, with_entropy: bool,
                      use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton:
        from minirl.kernels.logprobs import logprobs_fwd_triton
        logp, entropy, lse = logprobs_fwd_triton(logits, targets, with_entropy)
    else:  # the torch forward works in place on fp32 logits: give it a copy then
        inplace = with_entropy and logits.dtype in (torch.float32, torch.float64)
        logp, entropy, lse = logprobs_fwd_torch(logits.clone() if inplace else logits, targets,
                                                with_entropy)
    if entropy is None:
        entropy = logp.new_empty(0)
    return logp, entropy, lse


@token_logprobs_op.register_fake
def _(logits, targets, with_entropy, use_triton):
    n, dtype = logits.shape[0], compute_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n if with_entropy else 0, dtype=dtype),
            logits.new_empty(n, dtype=dtype))


@torch.library.custom_op("minirl::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
                               g_logp: Tensor, g_entropy: Optional[Tensor],
                               use_triton: bool) -> Tensor:
    """d loss / d logits [N, V] in the logits' dtype."""
    g_logp = g_logp.to(lse.dtype).contiguous()  # [N]
    g_entropy = None if g_entropy is None else g_entropy.to(lse.dtype).contiguous()  # [N]
    if use_triton:
        from minirl.kernels.logprobs import logprobs_bwd_triton
        return logprobs_bwd_triton(logits, targets, lse, entropy, g_logp, g_entropy)
    return logprobs_bwd_torch_(logits.clone(), targets, lse, entropy, g_logp, g_entropy)


@token_logprobs_backward_op.register_fake
def _(logits, targets, lse, entropy, g_logp, g_entropy, use_triton):
    return torch.empty_like(logits)


def _token_setup(ctx, inputs, output):
    logits, targets, with_entropy, use_triton = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)  # the logits by reference, no copy
    ctx.with_entropy, ctx.use_triton = with_entropy, use_triton


def _token_backward(ctx, g_logp, g_entropy, _g_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if g_logp is None:  # only the entropy was used
        g_logp = torch.zeros_like(lse)
    grad = token_logprobs_backward_op(logits, targets, lse, entropy, g_logp,
                                      g_entropy if ctx.with_entropy else None, ctx.use_triton)
    return grad, None, None, None


token_logprobs_op.register_autograd(_token_backward, setup_context=_token_setup)


# --------------------------------------------------------------------------------------
# minirl::linear_logprobs (kernel 2: chunked hidden @ lm_head.T, then kernel 1 per chunk)
# --------------------------------------------------------------------------------------

@torch.library.custom_op("minirl::linear_logprobs", mutates_args=())
def linear_logprobs_op(hidden: Tensor, weight: Tensor, targets: Tensor, with_entropy: bool,
                       chunk_size: int, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    return chunked_forward(hidden, weight, targets, with_entropy, chunk_size, use_triton)


@linear_logprobs_op.register_fake
def _(hidden, weight, targets, with_entropy, chunk_size, use_triton):
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n if with_entropy else 0, dtype=dtype),
            hidden.new_empty(n, dtype=dtype))


@torch.library.custom_op("minirl::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor,
                                entropy: Tensor, g_logp: Tensor, g_entropy: Optional[Tensor],
                                chunk_size: int, use_triton: bool, need_hidden: bool,
                                need_weight: bool) -> tuple[Tensor, Tensor]:
    """(grad_hidden [N, H] or [0], grad_weight [V, H] or [0])."""
    return chunked_backward(hidden, weight, targets, lse, entropy, g_logp, g_entropy, chunk_size,
                            use_triton, need_hidden, need_weight)


@linear_logprobs_backward_op.register_fake
def _(hidden, weight, targets, lse, entropy, g_logp, g_entropy, chunk_size, use_triton,
      need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0))


def _linear_setup(ctx, inputs, output):
    hidden, weight, targets, with_entropy, chunk_size, use_triton = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)  # no logits are kept
    ctx.with_entropy, ctx.chunk_size, ctx.use_triton = with_entropy, chunk_size, use_triton


def _linear_backward(ctx, g_logp, g_entropy, _g_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None
    if g_logp is None:  # only the entropy was used: dz = -p e (log p + H)
        g_logp = torch.zeros_like(lse)
    grad_h, grad_w = linear_logprobs_backward_op(
        hidden, weight, targets, lse, entropy, g_logp, g_entropy if ctx.with_entropy else None,
        ctx.chunk_size, ctx.use_triton, need_h, need_w)
    return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None, None


linear_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------------------
# minirl::grpo_token_loss (kernel 3; Triton only, see the module docstring)
# --------------------------------------------------------------------------------------

@torch.library.custom_op("minirl::grpo_token_loss", mutates_args=())
def grpo_token_loss_op(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                       ref_logp: Optional[Tensor], eps_low: float, eps_high: float, beta: float,
                       kl_estimator: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from minirl.kernels.grpo_loss import grpo_loss_fwd_triton
    return grpo_loss_fwd_triton(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta,
                                kl_estimator)


@grpo_token_loss_op.register_fake
def _(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta, kl_estimator):
    f32 = [torch.empty(logp.shape, dtype=torch.float32, device=logp.device) for _ in range(4)]
    return (*f32, torch.empty(logp.shape, dtype=torch.int8, device=logp.device))


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])  # dlogp, written by the forward


def _loss_backward(ctx, g_loss, _g_dlogp, _g_ratio, _g_kl, _g_clipped):
    (dlogp,) = ctx.saved_tensors
    grad = None if g_loss is None else g_loss * dlogp  # [N, T]: chain rule, elementwise
    return grad, None, None, None, None, None, None, None, None


grpo_token_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# --------------------------------------------------------------------------------------
# Dispatch: backend name -> op (inputs already valid; minirl.losses checks them)
# --------------------------------------------------------------------------------------

def token_logprobs(logits, targets, with_entropy, backend=None):
    """logits [N, V] (rows contiguous), targets [N] -> logprob [N] (, entropy [N])."""
    use_triton = resolve_backend(backend, logits.device) == "triton"
    logp, entropy, _ = token_logprobs_op(logits, targets, with_entropy, use_triton)
    return (logp, entropy) if with_entropy else logp


def linear_logprobs(hidden, weight, targets, with_entropy, chunk_size=None, backend=None):
    """hidden [N, H] contiguous, weight [V, H], targets [N] -> logprob [N] (, entropy [N]);
    chunk_size None: default_chunk_size."""
    use_triton = resolve_backend(backend, hidden.device) == "triton"
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    logp, entropy, _ = linear_logprobs_op(hidden, weight, targets, with_entropy, chunk_size,
                                          use_triton)
    return (logp, entropy) if with_entropy else logp


def grpo_token_loss(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp=None, beta=0.0,
                    kl_estimator="k3", backend=None):
    """(loss, ratio, kl, clipped), all [N, T], as kernels.reference.grpo_token_loss_reference
    defines them; the Triton op expects contiguous fp32 inputs and a bool mask."""
    if resolve_backend(backend, logp.device) == "triton":
        loss, _, ratio, kl, clipped = grpo_token_loss_op(logp, old_logp, adv, mask, ref_logp,
                                                         eps_low, eps_high, beta, kl_estimator)
        return loss, ratio, kl, clipped
    return grpo_token_loss_reference(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp, beta,
                                     kl_estimator)
