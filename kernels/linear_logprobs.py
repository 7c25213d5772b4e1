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


class LinearLogprobs(torch.autograd.Function):
    """The chunked fused linear log-probs (see the module docstring). `use_triton` picks
    kernel 1 (Triton) or its torch version for the per-chunk softmax maths; the chunking,
    matmuls and saved state are the same for both."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy, chunk_size, use_triton):
        if use_triton:
            from minirl.kernels.logprobs import logprobs_fwd_triton as fwd
        else:
            fwd = logprobs_fwd_torch
        N = hidden.shape[0]
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.empty(N, dtype=out_dtype, device=hidden.device)  # [N]
        lse = torch.empty(N, dtype=out_dtype, device=hidden.device)  # [N]
        entropy = torch.empty(N, dtype=out_dtype, device=hidden.device) if with_entropy else None
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            z = hidden[start:end] @ weight.t()  # [C, V] in the model dtype
            lp, ent, ls = fwd(z, targets[start:end], with_entropy)
            logp[start:end] = lp
            lse[start:end] = ls
            if with_entropy:
                entropy[start:end] = ent
            del z  # free this chunk before the next matmul allocates one

        ctx.save_for_backward(hidden, weight, targets, lse, entropy if with_entropy else lse)
        ctx.with_entropy = with_entropy
        ctx.chunk_size = chunk_size
        ctx.use_triton = use_triton
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        if ctx.use_triton:
            from minirl.kernels.logprobs import logprobs_bwd_triton

            def bwd_(z, t, ls, ent, g, e):
                return logprobs_bwd_triton(z, t, ls, ent, g, e, out=z)  # in place
        else:
            bwd_ = logprobs_bwd_torch_

        N = hidden.shape[0]
        if g_logp is None:  # only the entropy was used: dz = -p e (log p + H)
            g_logp = torch.zeros(N, dtype=lse.dtype, device=lse.device)
        g_logp = g_logp.to(lse.dtype).contiguous()  # [N]
        if g_entropy is not None:
            g_entropy = g_entropy.to(lse.dtype).contiguous()  # [N]

        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        grad_w = torch.zeros_like(weight) if need_w else None  # [V, H]
        for start in range(0, N, ctx.chunk_size):
            end = min(start + ctx.chunk_size, N)
            h_c = hidden[start:end]  # [C, H]
            z = h_c @ weight.t()  # [C, V] recomputed: the forward kept no logits
            e = None if g_entropy is None else g_entropy[start:end]
            dz = bwd_(z, targets[start:end], lse[start:end], entropy[start:end],
                      g_logp[start:end], e)  # [C, V], written over z
            if need_h:
                torch.matmul(dz, weight, out=grad_h[start:end])  # [C, H]
            if need_w:
                grad_w.addmm_(dz.t(), h_c)  # [V, H] += [V, C] @ [C, H]
            del z, dz
        return grad_h, grad_w, None, None, None, None


def linear_logprobs_chunked(hidden, weight, targets, return_entropy=False, chunk_size=None,
                            use_triton=False):
    """hidden [N, H], weight [V, H], targets [N] -> logprob [N] (, entropy [N]).

    Inputs already validated by minirl.losses.linear_logprobs (2-D, same device and dtype,
    hidden contiguous, targets in range)."""
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    return LinearLogprobs.apply(hidden, weight, targets, return_entropy, int(chunk_size),
                                use_triton)
