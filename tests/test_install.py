"""What `pip install` puts on a user's machine: the kernels as minirl.kernels, and no top-level
`kernels` package (that name belongs to Hugging Face's kernels, which transformers imports)."""
import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_sources(dst):
    """The files a wheel is built from (no build/ or egg-info left in the checkout)."""
    shutil.copy(os.path.join(ROOT, "setup.py"), dst)
    for d in ("minirl", "kernels"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dst, d),
                        ignore=shutil.ignore_patterns("__pycache__"))


def test_installed_package_has_minirl_kernels_and_no_top_level_kernels(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    copy_sources(src)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    top = sorted(p for p in os.listdir(site) if not p.endswith((".dist-info", ".egg-info")))
    assert top == ["minirl"], top
    installed = sorted(os.listdir(site / "minirl" / "kernels"))
    assert installed == sorted(f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))
    for f in installed:  # the folder's own files (the checkout shim minirl/kernels/__init__.py is not installed)
        assert (site / "minirl" / "kernels" / f).read_bytes() == (src / "kernels" / f).read_bytes(), f
    # In a fresh process whose path holds only the install (not the checkout, not the
    # editable install a developer may have): minirl and its kernels import from there.
    code = textwrap.dedent(f"""
        import sys
        sys.path[:] = [{str(site)!r}] + [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]
        sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]
        import minirl, minirl.kernels.reference, minirl.kernels.linear_logprobs
        from minirl.losses import linear_logprobs
        for m in (minirl, minirl.kernels, minirl.kernels.reference):
            assert m.__file__.startswith({str(site)!r}), m.__file__
        assert 'kernels' not in sys.modules
        print('ok')
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_checkout_imports_minirl_kernels_from_the_top_level_folder():
    """From a source checkout (no install), minirl.kernels is the repository's kernels/."""
    code = ("import sys, minirl.kernels.reference as r; print(r.__file__); "
            "assert 'kernels' not in sys.modules and 'kernels.reference' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(os.path.join(ROOT, "kernels", "reference.py"))
