"""kernels/aot.py: every Triton kernel variant the wrappers can launch compiles for sm_80 and
sm_90 on this CPU and stays within the targets' limits; and the checker reports planted
errors (a kernel needing more shared memory than the target has, one that does not compile).

The compiler cannot run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
each test runs its check in a child process without it. A cold run compiles 160 variants
(about 4 minutes on a busy 2-core CPU); Triton's on-disk cache makes later runs take seconds."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.fresh_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    out = _run(["-m", "minirl.kernels.aot", "--json", str(tmp_path / "aot.json")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "aot.json").read_text())
    assert all(r["error"] is None for r in rows)
    assert "0 failed" in out.stdout and "sm_80" in out.stdout and "sm_90" in out.stdout

    def variants(kernel, *names):
        return {(r["arch"],) + tuple(r["options"][n] for n in names) for r in rows if r["kernel"] == kernel}
    both = ("sm_80", "sm_90")
    assert variants("_logprobs_fwd_kernel", "WITH_ENTROPY") == {(a, e) for a in both for e in (False, True)}
    assert variants("_logprobs_bwd_kernel", "HAS_G_LOGP", "HAS_G_ENTROPY") == {
        (a, g, e) for a in both for g in (False, True) for e in (False, True)}
    assert variants("_grpo_loss_kernel", "KL") == {(a, k) for a in both for k in (0, 1, 2, 3)}
    logits_dtypes = {r["signature"]["logits_ptr"] for r in rows if r["kernel"].startswith("_logprobs")}
    assert logits_dtypes == {"*bf16", "*fp16", "*fp32"}
    # Real vocabularies (32k..152k) all get the GPU block of 4096 columns and 8 warps.
    assert {(r["options"]["BLOCK_V"], r["options"]["num_warps"]) for r in rows
            if r["kernel"].startswith("_logprobs")} == {(4096, 8)}
    for r in rows:  # figures are there and plausible
        assert 0 < r["regs"] <= 255 and r["shared"] >= 0 and r["local"] >= 0, r


def test_launch_list_covers_every_kernel_in_the_package():
    code = textwrap.dedent("""
        from minirl.kernels import aot
        launched = {f"{k.__module__.rsplit('.', 1)[1]}.{k.__name__}" for k, *_ in aot.all_launches()}
        assert launched == aot.kernels_in_package(), (launched, aot.kernels_in_package())
        for kernel, args, options, label in aot.all_launches():
            aot.specialise(kernel, args, options, 90)  # every constexpr named, args match
        print(len(aot.unique_variants(aot.all_launches())))
    """)
    out = _run(["-c", code], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == 80


PLANTED = textwrap.dedent("""
    import json, torch, triton, triton.language as tl
    from minirl.kernels import aot

    @triton.jit
    def _transpose_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], tl.trans(x))  # through shared memory

    @triton.jit
    def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + r)
        tl.store(x_ptr + r, tl.dot(x, x))  # tl.dot needs 2-D blocks

    f32 = torch.empty(4, device="meta")
    rows = (aot.check([(_transpose_kernel, (f32, f32), {"BLOCK": 32, "num_warps": 4}, "fits")])
            + aot.check([(_transpose_kernel, (f32, f32), {"BLOCK": 512, "num_warps": 16}, "too big")],
                        archs=(80,))
            + aot.check([(_broken_kernel, (f32,), {"BLOCK": 64, "num_warps": 4}, "broken")], archs=(90,)))
    print(json.dumps(rows, default=str))
""")


def test_checker_reports_planted_errors(tmp_path):
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    out = _run([str(script)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    fits = [r for r in rows if r["used_by"] == ["fits"]]
    assert [r["arch"] for r in fits] == ["sm_80", "sm_90"] and all(r["error"] is None for r in fits)
    big = next(r for r in rows if r["used_by"] == ["too big"])
    assert big["shared"] > 166912 and "exceeds sm_80 limits: shared memory" in big["error"]
    broken = next(r for r in rows if r["used_by"] == ["broken"])
    assert broken["error"].startswith("does not compile") and "rank" in broken["error"]
