"""Triton kernel 1: token log-probs (and entropy) from logits, forward and backward.

Computes, for logits z [N, V] (bf16, fp16 or fp32) and targets t [N]:

    logprob[n] = z[n, t_n] - lse_n,       lse_n = log sum_j exp(z[n, j])          [N] fp32
    entropy[n] = -sum_j p[n, j] log p[n, j]                                      [N] fp32

exactly what `kernels.reference.token_logprobs_reference` defines, without ever making an
fp32 copy of the logits: one program per row streams the row in blocks of BLOCK_V columns
and keeps a running (online) log-sum-exp in fp32 registers. The backward streams the row
again and writes d loss / d logits in the logits' dtype (so a bf16 model gets bf16 grads,
the same size as its logits, and nothing [N, V] in fp32 is ever allocated).

Gradient maths (p = softmax(z), t the target, g / e the upstream grads of logprob / entropy):

    log p_t = z_t - log sum_k exp(z_k)
      d log p_t / d z_j = 1[j = t] - exp(z_j) / sum_k exp(z_k) = 1[j = t] - p_j
    H = -sum_k p_k log p_k,  with d p_k / d z_j = p_k (1[k = j] - p_j)
                             and  d log p_k / d z_j = 1[k = j] - p_j:
      d H / d z_j = -sum_k p_k (1[k = j] - p_j) log p_k - sum_k p_k (1[k = j] - p_j)
                  = -(p_j log p_j - p_j sum_k p_k log p_k) - (p_j - p_j)
                  = -p_j (log p_j + H)
    so  d loss / d z_j = g 1[j = t] - p_j (g + e (log p_j + H)).

The forward saves lse [N] and entropy [N] (not the softmax) so the backward needs one pass.

Offsets: row * row_stride is computed in int64; in int32 it overflows once N * V >= 2^31
(14,000 tokens at V = 151,936).
"""
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_config(V):
    """Fixed block sizes (no autotune: it needs a GPU driver, so it fails in the interpreter).

    GPU: 4096 columns per step, 8 warps (16 fp32 values per thread per step). Interpreter:
    each step costs a few numpy calls whatever its size, so take the largest blocks."""
    cap = 16384 if _interpreting() else 4096
    block = min(cap, triton.next_power_of_2(V))
    return block, (8 if block >= 4096 else 4)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, row_stride, targets_ptr,  # inputs: logits [N, V] (rows strided), targets [N]
    logp_ptr, entropy_ptr, lse_ptr,  # outputs [N] fp32
    V,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 so that row * row_stride cannot overflow
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)

    # Online log-sum-exp over blocks of the row. With m the largest logit seen so far:
    #   s = sum_j exp(z_j - m)                  (so lse = m + log s)
    #   u = sum_j exp(z_j - m) (z_j - m)        (so sum_j p_j log p_j = u / s - log s)
    # When a block raises m to m_new, old terms are rescaled by alpha = exp(m - m_new), and
    # since (z - m_new) = (z - m) + (m - m_new):   u <- alpha (u + (m - m_new) s).
    # Keeping u relative to m (not sum p z, then minus lse) avoids cancelling two large
    # numbers: H of a peaked distribution stays accurate.
    # m starts finite (not -inf) so that (m - m_new) * s is 0 * finite on the first block.
    m = -1e30
    s = 0.0
    u = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        z = tl.load(row_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)  # [BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on the padding lanes (z = -inf)
        if WITH_ENTROPY:
            d = tl.where(valid, z - m_new, 0.0)  # avoid 0 * -inf = nan on padding lanes
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_t = tl.load(row_ptr + target).to(tl.float32)  # the host checked 0 <= target < V
    tl.store(logp_ptr + row, z_t - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(s) - u / s)  # H = -(u / s - log s)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, row_stride, grad_ptr, grad_row_stride, targets_ptr,  # grad may alias logits
    lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,  # [N] fp32 each
    V,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)

    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = 0.0
    if HAS_G_LOGP:
        g = tl.load(g_logp_ptr + row)
    if HAS_G_ENTROPY:
        e = tl.load(g_entropy_ptr + row)
        H = tl.load(entropy_ptr + row)

    # Each element is read, then written, by this program alone: the gradient can overwrite
    # the logits in place (the fused linear path does that to its chunk of logits).
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        z = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_V]
        logp = z - lse
        p = tl.exp(logp)
        if HAS_G_ENTROPY:
            dz = -p * (g + e * (logp + H))  # d loss / d z_j = g 1[j=t] - p_j (g + e (log p_j + H))
        else:
            dz = -p * g
        dz = tl.where(offs == target, dz + g, dz)
        tl.store(grad_row_ptr + offs, dz.to(grad_ptr.dtype.element_ty), mask=valid)


def _fwd_launch(z, targets, logp, entropy, lse, with_entropy):
    """The forward kernel's grid, arguments and compile-time options, exactly as launched
    (also read by aot_launches, so the AOT check compiles what runs)."""
    N, V = z.shape
    block, warps = _launch_config(V)
    args = (z, z.stride(0), targets, logp, entropy, lse, V)
    return (N,), args, dict(WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps)


def _bwd_launch(z, out, targets, lse, entropy, g_logp, g_entropy):
    """The backward kernel's grid, arguments and options (absent inputs replaced by lse,
    never read: the constexpr flags switch their loads off)."""
    N, V = z.shape
    block, warps = _launch_config(V)
    args = (z, z.stride(0), out, out.stride(0), targets,
            lse, entropy if entropy is not None else lse,
            g_logp if g_logp is not None else lse, g_entropy if g_entropy is not None else lse,
            V)
    return (N,), args, dict(HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None,
                            BLOCK_V=block, num_warps=warps)


def logprobs_fwd_triton(z, targets, with_entropy):
    """Forward over rows of z [N, V] (last dim contiguous) -> (logprob [N], entropy [N] or
    None, lse [N]), all fp32. Same contract as kernels.reference.logprobs_fwd_torch, except
    that z is left untouched."""
    N, V = z.shape
    logp = torch.empty(N, dtype=torch.float32, device=z.device)
    lse = torch.empty(N, dtype=torch.float32, device=z.device)
    entropy = torch.empty(N, dtype=torch.float32, device=z.device) if with_entropy else lse
    if N == 0:
        return logp, (entropy if with_entropy else None), lse
    grid, args, meta = _fwd_launch(z, targets, logp, entropy, lse, with_entropy)
    _logprobs_fwd_kernel[grid](*args, **meta)
    return logp, (entropy if with_entropy else None), lse


def logprobs_bwd_triton(z, targets, lse, entropy, g_logp, g_entropy, out=None):
    """Backward over rows of z [N, V]: d loss / d z in z's dtype, into `out` (a new tensor
    if None; may be z itself). g_logp / g_entropy: fp32 [N] contiguous, or None."""
    N, V = z.shape
    if out is None:
        out = torch.empty((N, V), dtype=z.dtype, device=z.device)
    if N == 0:
        return out
    grid, args, meta = _bwd_launch(z, out, targets, lse, entropy, g_logp, g_entropy)
    _logprobs_bwd_kernel[grid](*args, **meta)
    return out


# Vocabularies the AOT check compiles for: Llama-2/Mistral, SmolLM2, GPT-2, Llama-3, Qwen2.5.
# (Their sizes pick the block; whether a size is a multiple of 16 picks Triton's
# specialisation of the integer arguments, and both kinds are here.)
REAL_VOCABS = (32000, 49152, 50257, 128256, 151936)
LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what minirl.losses accepts
TARGET_DTYPES = (torch.int64, torch.int32)


def aot_launches(vocabs=REAL_VOCABS):
    """Every launch the wrappers above can make on a GPU, for the vocabularies given, as
    (kernel, args, options, label): built by the same _fwd_launch / _bwd_launch on meta
    tensors (no memory), over every flag and input dtype the wrappers accept."""
    import itertools

    def meta(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    out = []
    for V, dt, tdt in itertools.product(vocabs, LOGIT_DTYPES, TARGET_DTYPES):
        z, t, row = meta(2, V, dtype=dt), meta(2, dtype=tdt), meta(2)
        name = f"V={V} {str(dt)[6:]} {str(tdt)[6:]}"
        for with_entropy in (False, True):
            _, args, opts = _fwd_launch(z, t, row, row, row, with_entropy)
            out.append((_logprobs_fwd_kernel, args, opts, name))
        for has_g, has_e in itertools.product((False, True), repeat=2):
            _, args, opts = _bwd_launch(z, z, t, row, row if has_e else None,
                                        row if has_g else None, row if has_e else None)
            out.append((_logprobs_bwd_kernel, args, opts, name))
    return out
