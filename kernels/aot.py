"""Ahead-of-time compile check: every Triton kernel launch minirl can make, compiled for real
GPUs (A100 = sm_80, H100 = sm_90) on a machine without one, against the targets' limits.

The launches come from the kernel modules themselves (`aot_launches()` in logprobs.py and
grpo_loss.py), built by the same functions the wrappers launch with, over every flag, input
dtype and real vocabulary size (kernels/logprobs.py: REAL_VOCABS), so a new variant cannot
be left out. Each is turned into a signature, constexprs and alignment attributes by
Triton's own specialisation rule (what the runtime would compile for those arguments), then
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole
toolchain to a cubin with the ptxas shipped in the triton wheel. Reported per variant:

    shared   bytes of shared memory per program (Triton's allocation, metadata.shared,
             plus any static shared memory in the cubin)
    regs     registers per thread, and local (spill) bytes per thread, read from the cubin
             with the wheel's cuobjdump --dump-resource-usage

A variant fails if it does not compile, or if it exceeds the target's limits: shared memory
per block (opt-in maximum: sm_80 163 KB = 166,912 bytes, sm_90 227 KB = 232,448 bytes),
registers per block (65,536) or threads per block (1,024). These are compiler figures, not
measurements on a GPU.

    python -m minirl.kernels.aot              # table for sm_80 and sm_90, exit 1 on a failure
    python -m minirl.kernels.aot --arch 90 --json report.json

Runs without TRITON_INTERPRET (the interpreter replaces the compiler); Triton's on-disk
cache (~/.triton/cache) makes a second run fast.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Per-block limits by compute capability (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): opt-in shared memory, 32-bit registers, threads.
LIMITS = {80: {"shared": 166912, "regs_per_block": 65536, "threads": 1024},
          90: {"shared": 232448, "regs_per_block": 65536, "threads": 1024}}


def all_launches():
    """(kernel, args, options, label) for every launch of every kernel in kernels/."""
    from minirl.kernels import grpo_loss, logprobs
    return logprobs.aot_launches() + grpo_loss.aot_launches()


def kernels_in_package():
    """Every @triton.jit function defined in kernels/ (the test checks each has launches)."""
    import importlib

    import triton
    found = set()
    for name in ("logprobs", "grpo_loss", "linear_logprobs"):
        module = importlib.import_module(f"minirl.kernels.{name}")
        found |= {f"{name}.{k}" for k, v in vars(module).items() if isinstance(v, triton.JITFunction)}
    return found


def specialise(kernel, args, options, arch):
    """(signature, constexprs, attrs, compile options) as Triton's launcher would build them
    for these arguments (meta tensors stand in for real ones: only dtype and address count)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl
    backend = make_backend(GPUTarget("cuda", arch, 32))
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages", "num_ctas")}
    constexprs = {k: v for k, v in options.items() if k not in opts}
    signature, attrs = {}, {}
    positional = [p for p in kernel.params if not p.is_constexpr]
    if len(positional) != len(args) or set(constexprs) != {p.name for p in kernel.params if p.is_constexpr}:
        raise ValueError(f"{kernel.__name__}: launch arguments do not match the kernel's parameters")
    for param, arg in zip(positional, args):
        i = kernel.params.index(param)
        kind, attr = native_specialize_impl(backend, arg, False, True, True)[:2]
        signature[param.name] = kind
        if kind == "constexpr":  # Triton turns an integer equal to 1 into a constant
            constexprs[param.name] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
    return signature, constexprs, attrs, opts


def unique_variants(launches):
    """Group launches that compile to the same thing; keep every label that needs it."""
    variants = {}
    for kernel, args, options, label in launches:
        signature, constexprs, attrs, opts = specialise(kernel, args, options, 90)
        key = (kernel.__name__, json.dumps(signature), json.dumps(sorted(constexprs.items())),
               str(sorted(attrs.items())), json.dumps(sorted(opts.items())))
        variants.setdefault(key, {"kernel": kernel, "args": args, "options": options, "labels": []})
        variants[key]["labels"].append(label)
    return list(variants.values())


def resource_usage(cubin: bytes):
    """(registers, local bytes, static shared bytes) per thread/block from cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, timeout=60).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", out)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{out}")
    return found["REG"], found.get("LOCAL", 0), found.get("SHARED", 0)


def compile_variant(kernel, args, options, arch):
    """Compile one launch for sm_<arch>; a dict with the figures and `error` (None: within
    the limits)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = {"kernel": kernel.__name__, "arch": f"sm_{arch}", "options": dict(options),
           "error": None}
    start = time.perf_counter()
    try:
        signature, constexprs, attrs, opts = specialise(kernel, args, options, arch)
        row["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
        names = [p.name for p in kernel.params]
        row["div16"] = [names[i] for (i,), a in attrs.items() if a and not signature[names[i]].startswith("*")]
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=opts)
        regs, local, static_shared = resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a compiler error is a finding, reported in the table
        row["error"] = f"does not compile: {type(e).__name__}: {str(e).strip()[-400:]}"
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row
    threads = compiled.metadata.num_warps * 32
    row.update(shared=compiled.metadata.shared + static_shared, regs=regs, local=local,
               threads=threads, seconds=round(time.perf_counter() - start, 2))
    limits, over = LIMITS[arch], []
    if row["shared"] > limits["shared"]:
        over.append(f"shared memory {row['shared']} B > {limits['shared']} B")
    if regs * threads > limits["regs_per_block"]:
        over.append(f"{regs} registers x {threads} threads > {limits['regs_per_block']}")
    if threads > limits["threads"]:
        over.append(f"{threads} threads > {limits['threads']}")
    if over:
        row["error"] = "exceeds sm_%d limits: %s" % (arch, "; ".join(over))
    return row


def check(launches, archs=(80, 90)):
    """Compile every distinct variant of `launches` for each arch -> list of row dicts."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT check needs the compiler: unset TRITON_INTERPRET")
    rows = []
    for v in unique_variants(launches):
        for arch in archs:
            row = compile_variant(v["kernel"], v["args"], v["options"], arch)
            row["used_by"] = v["labels"]
            rows.append(row)
    return rows


def format_table(rows):
    """One line per variant and arch: kernel, constexprs, dtypes, figures or the error."""
    lines = [f"{'kernel':<22} {'arch':<6} {'variant':<60} {'shared B':>8} {'regs':>4} "
             f"{'spill B':>7}  status"]
    for r in rows:
        const = " ".join(f"{k}={v}" for k, v in r["options"].items())
        sig = r.get("signature", {})
        ptrs = ",".join(v[1:] for v in sig.values() if v.startswith("*"))
        div16 = ",".join(k for k, v in sig.items() if not v.startswith("*") and k in r.get("div16", ()))
        variant = f"{const} [{ptrs}]" + (f" {div16}%16=0" if div16 else "")
        if r["error"] and "regs" not in r:
            lines.append(f"{r['kernel']:<22} {r['arch']:<6} {variant:<60} {'-':>8} {'-':>4} "
                         f"{'-':>7}  FAIL {r['error']}")
            continue
        status = f"FAIL {r['error']}" if r["error"] else "ok"
        lines.append(f"{r['kernel']:<22} {r['arch']:<6} {variant:<60} {r['shared']:>8} "
                     f"{r['regs']:>4} {r['local']:>7}  {status}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compile every Triton kernel variant for "
                                     "sm_80 / sm_90 and check the targets' limits")
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(LIMITS), default=[80, 90])
    parser.add_argument("--json", help="also write the rows to this file")
    a = parser.parse_args(argv)
    start = time.perf_counter()
    rows = check(all_launches(), tuple(a.arch))
    print(format_table(rows))
    failed = [r for r in rows if r["error"]]
    print(f"{len(rows)} compiles ({len(rows) // len(a.arch)} variants x {len(a.arch)} archs) in "
          f"{time.perf_counter() - start:.0f} s; {len(failed)} failed")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        os.replace(tmp, a.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
