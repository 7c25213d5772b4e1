"""Kernel 2: fused linear log-probs. hidden [N, H], lm-head weight [V, H], targets [N] ->

    logprob[n] = log softmax(hidden[n] @ weight.T)[t_n]        [N] fp32
    entropy[n] = -sum_j p[n, j] log p[n, j]                    [N] fp32 (optional)

with gradients to hidden and weight, holding at most one chunk of C rows of logits [C, V]
at a time instead of [N, V] (at N = 16k tokens and V = 151,936 the full fp32 logits are
~10 GB, and autograd's copies and gradient several times that).

How: the token dimension is cut into chunks of C rows. Per chunk
    forward:   z = h_c @ W.T          [C, V]   (torch matmul: cuBLAS on GPU)
               logprob, entropy, lse  [C]      (kernel 1, or its torch version on CPU)
    backward:  z = h_c @ W.T          [C, V]   recomputed
               dz = d loss / d z      [C, V]   written over z (kernel 1 backward)
               grad_h_c  = dz @ W      [C, H]
               grad_W   += dz.T @ h_c  [V, H]
Only hidden, weight (references, no copy), lse [N] and entropy [N] are saved.

Why recompute instead of computing the gradients during the forward (as Liger's fused
linear cross-entropy does): Liger's output is one scalar loss, so its upstream gradient is
a single number known to scale everything, and grad_W can be accumulated in the forward.
Here the outputs are per token, and the upstream gradients g_n (logprob) and e_n (entropy)
differ per token and are unknown until backward. grad_h could still be precomputed (two
[N, H] buffers, scaled per row later), but
    grad_W = sum_n dz_n(g_n, e_n)^T h_n
mixes the per-token factors inside the sum over n, so it cannot be factored out: it needs
dz for every token at backward time, i.e. either [N, V] stored (what we avoid) or the logits
recomputed. Recomputing costs one extra [C, H] x [H, V] matmul per chunk: 4 matmuls in
total instead of the naive 3 (about +33% of the matmul FLOPs), for memory O(C x V).
(Fusing the GRPO loss into this function would make g_n known in the forward and remove that
matmul; minirl keeps the loss separate because it is simpler and the loss is tiny [N, T]
elementwise work.)

Precision: the chunk logits are produced in the dtype of hidden/weight (bf16 on GPU, exactly
what a naive `hidden @ W.T` gives); all softmax maths is fp32; grad_W is accumulated with
addmm in the weight's dtype, as Liger does, so a bf16 grad_W is rounded once per chunk
rather than once. Measured on CPU (N=2048, H=64, V=512, bf16, max relative error of grad_W
vs float64): 1 chunk 0.72% (= naive), 4 chunks 0.76%, 16 chunks 1.1%, 42 chunks 1.3%,
128 chunks 2.3%. The same happens to any bf16 .grad accumulated over micro-batches; an fp32
accumulator would cost one fp32 [V, H] (0.9 GB for Qwen2.5-1.5B) and, without a matmul that
writes fp32 from bf16 inputs, an extra pass over it per chunk.
"""
import torch

from minirl.kernels.reference import logprobs_bwd_torch_, logprobs_fwd_torch


def default_chunk_size(n_rows: int, vocab: int, device) -> int:
    """Rows per chunk: a chunk of logits holds about 2^26 elements on GPU (128 MB in bf16:
    big matmuls, enough rows to fill the SMs in kernel 1) and 2^24 on CPU (64 MB in fp32:
    the CPU path keeps at most two such buffers, see kernels.reference), at least 1 row.
    Above 64 rows it is rounded down to a multiple of 64 (matmul tiles)."""
    budget = 2**26 if torch.device(device).type == "cuda" else 2**24
    rows = max(1, budget // max(1, vocab))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


def _per_chunk_maths(use_triton):
    """(forward, in-place backward) over one chunk of logits: kernel 1 or its torch version."""
    if not use_triton:
        return logprobs_fwd_torch, logprobs_bwd_torch_
    from minirl.kernels.logprobs import logprobs_bwd_triton, logprobs_fwd_triton

    def bwd_(z, t, ls, ent, g, e):
        return logprobs_bwd_triton(z, t, ls, ent, g, e, out=z)  # in place
    return logprobs_fwd_triton, bwd_


def chunked_forward(hidden, weight, targets, with_entropy, chunk_size, use_triton):
    """hidden [N, H], weight [V, H], targets [N] -> (logprob [N], entropy [N] (empty [0]
    without with_entropy), lse [N]), fp32 (fp64 for fp64 inputs). Inputs already validated
    (2-D, one device and dtype, hidden contiguous, targets in range); no autograd here:
    the custom op minirl::linear_logprobs (kernels/ops.py) wraps this and chunked_backward."""
    fwd, _ = _per_chunk_maths(use_triton)
    N = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, dtype=out_dtype, device=hidden.device)  # [N]
    lse = torch.empty(N, dtype=out_dtype, device=hidden.device)  # [N]
    entropy = torch.empty(N if with_entropy else 0, dtype=out_dtype, device=hidden.device)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        z = hidden[start:end] @ weight.t()  # [C, V] in the model dtype
        lp, ent, ls = fwd(z, targets[start:end], with_entropy)
        logp[start:end] = lp
        lse[start:end] = ls
        if with_entropy:
            entropy[start:end] = ent
        del z  # free this chunk before the next matmul allocates one
    return logp, entropy, lse


def chunked_backward(hidden, weight, targets, lse, entropy, g_logp, g_entropy, chunk_size,
                     use_triton, need_hidden, need_weight):
    """Gradients (grad_hidden [N, H], grad_weight [V, H]) for upstream g_logp [N] and
    g_entropy [N] (or None), recomputing each chunk's logits; a gradient not needed is
    returned as an empty [0] tensor."""
    _, bwd_ = _per_chunk_maths(use_triton)
    N = hidden.shape[0]
    g_logp = g_logp.to(lse.dtype).contiguous()  # [N]
    if g_entropy is not None:
        g_entropy = g_entropy.to(lse.dtype).contiguous()  # [N]
    empty = hidden.new_empty(0)
    grad_h = torch.empty_like(hidden) if need_hidden else empty  # [N, H]
    grad_w = torch.zeros_like(weight) if need_weight else empty  # [V, H]
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h_c = hidden[start:end]  # [C, H]
        z = h_c @ weight.t()  # [C, V] recomputed: the forward kept no logits
        e = None if g_entropy is None else g_entropy[start:end]
        ent = None if g_entropy is None else entropy[start:end]
        dz = bwd_(z, targets[start:end], lse[start:end], ent, g_logp[start:end], e)  # over z
        if need_hidden:
            torch.matmul(dz, weight, out=grad_h[start:end])  # [C, H]
        if need_weight:
            grad_w.addmm_(dz.t(), h_c)  # [V, H] += [V, C] @ [C, H]
        del z, dz
    return grad_h, grad_w
