"""Run folders and files (docs/runs.md): checkpoints verified before resume chooses one and
the fallback to the newest valid one, leftover .tmp-* folders, torn last lines in append-only
files, permissions under the umask, unwritable outputs, the clone-folder import guard; then
the same end to end through train_grpo.py and evaluate.py sample as a user runs them."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import minirl
from minirl.common import AtomicDir, MinirlError, atomic_write_json, check_writable_dir, read_jsonl
from minirl.training import MasterAdamW, RunDir, check_out_dir, load_checkpoint, verify_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"t_gen", "t_train", "gen_tok_s", "train_tok_s"}


def truncate(path, keep_fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def run_with_checkpoints(tiny_model_dir, tmp_path):
    """A run folder with checkpoints at steps 2, 4 and 6 (different weights each)."""
    model = minirl.load_model(tiny_model_dir, device="cpu")
    tok = minirl.load_tokenizer(tiny_model_dir)
    opt = MasterAdamW(model.parameters(), lr=1e-2)
    run = RunDir(tmp_path / "run")
    for step in (2, 4, 6):
        loss = model(torch.tensor([[3, 4, 5, step]])).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.save_checkpoint(step, model, tok, opt, extra={"data_pos": step}, keep_last=3)
    return run


def ckpt(run, step):
    return os.path.join(run.ckpt_root, f"step_{step:06d}")


# ---------------------------------------------------------------- checkpoints


def test_manifest_lists_every_file_and_intact_checkpoints_verify(run_with_checkpoints):
    run = run_with_checkpoints
    assert [os.path.basename(c) for c in run.checkpoints()] == ["step_000002", "step_000004", "step_000006"]
    manifest = json.load(open(os.path.join(ckpt(run, 6), "manifest.json")))
    assert manifest["step"] == 6
    listed = manifest["files"]
    on_disk = {os.path.relpath(os.path.join(r, n), ckpt(run, 6)) for r, _, ns in os.walk(ckpt(run, 6)) for n in ns}
    assert set(listed) == on_disk - {"manifest.json"}
    assert {"trainer_state.pt", "model/model.safetensors", "model/config.json"} <= set(listed)
    assert listed["model/model.safetensors"]["size"] == os.path.getsize(os.path.join(ckpt(run, 6), "model", "model.safetensors"))
    assert all(verify_checkpoint(c) is None for c in run.checkpoints())
    assert run.resume_checkpoint() == (ckpt(run, 6), [])
    assert run.latest_checkpoint() == ckpt(run, 6)


@pytest.mark.parametrize("damaged,why", [
    ("model/model.safetensors", "model/model.safetensors truncated"),
    ("trainer_state.pt", "trainer_state.pt truncated"),
    ("model/config.json", "model/config.json truncated"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(run_with_checkpoints, damaged, why):
    run = run_with_checkpoints
    truncate(os.path.join(ckpt(run, 6), damaged))
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 4)
    assert len(notes) == 1
    assert notes[0].startswith(f"checkpoint step_000006 is damaged ({why}")
    assert notes[0].endswith("; resuming from step_000004")
    model, state = load_checkpoint(path, "cpu", torch.float32)
    assert state["step"] == 4 and state["extra"] == {"data_pos": 4}


def test_two_damaged_checkpoints_fall_back_twice(run_with_checkpoints):
    run = run_with_checkpoints
    truncate(os.path.join(ckpt(run, 6), "trainer_state.pt"))
    os.remove(os.path.join(ckpt(run, 4), "model", "model.safetensors"))
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 2)
    assert [n.split(" (")[0] for n in notes] == ["checkpoint step_000006 is damaged", "checkpoint step_000004 is damaged"]
    assert "model/model.safetensors missing" in notes[1]


def test_every_checkpoint_damaged_is_one_clear_error(run_with_checkpoints):
    run = run_with_checkpoints
    for step in (2, 4, 6):
        truncate(os.path.join(ckpt(run, step), "trainer_state.pt"), 0.9)
    with pytest.raises(MinirlError, match=r"every checkpoint in .* is damaged \(step_000006: trainer_state.pt truncated"):
        run.resume_checkpoint()


def test_zeroed_weights_of_the_right_size_are_caught(run_with_checkpoints):
    """A power cut can leave a file at its full size but full of zero bytes."""
    run = run_with_checkpoints
    path = os.path.join(ckpt(run, 6), "model", "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(bytes(size))
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 4)
    assert notes == ["checkpoint step_000006 is damaged (model/model.safetensors does not start with the "
                     "header it was written with); resuming from step_000004"]


def test_checkpoint_without_manifest_is_accepted_and_still_checked(run_with_checkpoints):
    """Checkpoints written before manifests existed: accepted when their files read."""
    run = run_with_checkpoints
    for step in (4, 6):
        os.remove(os.path.join(ckpt(run, step), "manifest.json"))
    assert run.resume_checkpoint() == (ckpt(run, 6), [])
    truncate(os.path.join(ckpt(run, 6), "trainer_state.pt"))  # zip directory lost
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 4) and "trainer_state.pt unreadable" in notes[0]
    truncate(os.path.join(ckpt(run, 4), "model", "model.safetensors"), 0.8)
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 2) and "model.safetensors: file is truncated" in notes[1]


def test_corrupt_trainer_state_is_a_minirl_error_naming_the_file(run_with_checkpoints):
    """load_checkpoint on its own (e.g. a damaged file that still has its size)."""
    run = run_with_checkpoints
    state = os.path.join(ckpt(run, 6), "trainer_state.pt")
    for damage in ("truncate", "scramble"):
        if damage == "truncate":
            truncate(state)
        else:
            with open(state, "wb") as f:
                f.write(os.urandom(4096))
        with pytest.raises(MinirlError, match=r"trainer_state.pt: damaged trainer state") as e:
            load_checkpoint(ckpt(run, 6), "cpu", torch.float32)
        assert "\n" not in str(e.value)


def test_leftover_tmp_folders_are_removed_on_resume(run_with_checkpoints):
    run = run_with_checkpoints
    # What a kill during save_checkpoint leaves (AtomicDir's temporary names).
    shutil.copytree(ckpt(run, 6), os.path.join(run.ckpt_root, ".tmp-step_000008-abc123"))
    truncate(os.path.join(run.ckpt_root, ".tmp-step_000008-abc123", "trainer_state.pt"))
    os.makedirs(os.path.join(run.ckpt_root, ".tmp-step_000006-xyz.old"))
    # ... and what a kill while writing final/ or args.json leaves in the run folder.
    shutil.copytree(os.path.join(ckpt(run, 6), "model"), os.path.join(run.path, ".tmp-final-q9"))
    open(os.path.join(run.path, ".tmp-w2args.json"), "w").write('{"lr": ')
    assert [os.path.basename(c) for c in run.checkpoints()] == ["step_000002", "step_000004", "step_000006"]
    path, notes = run.resume_checkpoint()
    assert path == ckpt(run, 6)
    assert notes == ["removed 4 unfinished file(s) left by an interrupted save (.tmp-final-q9, .tmp-w2args.json, "
                     "checkpoints/.tmp-step_000006-xyz.old, checkpoints/.tmp-step_000008-abc123)"]
    assert sorted(os.listdir(run.ckpt_root)) == ["step_000002", "step_000004", "step_000006"]
    assert sorted(os.listdir(run.path)) == ["checkpoints"]


def test_saving_again_replaces_a_damaged_checkpoint(run_with_checkpoints, tiny_model_dir):
    run = run_with_checkpoints
    truncate(os.path.join(ckpt(run, 6), "model", "model.safetensors"))
    path, _ = run.resume_checkpoint()
    model, state = load_checkpoint(path, "cpu", torch.float32)
    opt = MasterAdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(state["optimizer"])
    run.save_checkpoint(6, model, minirl.load_tokenizer(tiny_model_dir), opt, keep_last=3)
    assert verify_checkpoint(ckpt(run, 6)) is None
    assert sorted(os.listdir(run.ckpt_root)) == ["step_000002", "step_000004", "step_000006"]


# ---------------------------------------------------------------- torn lines


def write_metrics(run, steps, tail=""):
    with open(run.metrics_path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "reward_mean": s / 10}) + "\n")
        f.write(tail)


@pytest.mark.parametrize("tail", ['{"step": 5, "reward_me', '{"step": 5}\x00\x00', "\x00" * 40])
def test_torn_last_metrics_line_is_dropped(tmp_path, tail):
    run = RunDir(tmp_path / "run")
    write_metrics(run, [1, 2, 3, 4], tail)
    notes = run.truncate_metrics(3)
    assert [m["step"] for m in map(json.loads, open(run.metrics_path))] == [1, 2, 3]
    assert notes == [f"{run.metrics_path}: dropped a torn last line (a write cut short)"]
    write_metrics(run, [1, 2])
    assert run.truncate_metrics(3) == []  # nothing torn: no note
    assert open(run.metrics_path).read().count("\n") == 2


def test_complete_last_line_without_newline_is_kept(tmp_path):
    run = RunDir(tmp_path / "run")
    write_metrics(run, [1, 2], '{"step": 3}')
    assert run.truncate_metrics(3) == []
    assert [m["step"] for m in map(json.loads, open(run.metrics_path))] == [1, 2, 3]


def test_bad_line_in_the_middle_is_still_an_error(tmp_path):
    run = RunDir(tmp_path / "run")
    write_metrics(run, [1], '{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(MinirlError, match=r"metrics.jsonl:2: not valid JSON"):
        run.truncate_metrics(3)
    with pytest.raises(MinirlError, match=r"metrics.jsonl:2: not valid JSON"):
        list(read_jsonl(run.metrics_path, torn_tail=True))
    write_metrics(run, [1], '{"step": 2, "rew')
    with pytest.raises(MinirlError, match=r"metrics.jsonl:2: not valid JSON"):
        list(read_jsonl(run.metrics_path))  # readers of finished files keep refusing it


# ---------------------------------------------------------------- permissions


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_follow_the_umask(tiny_model_dir, tmp_path, umask):
    """What plain open() / os.makedirs would give: 0644 / 0755 under umask 022."""
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    run = RunDir(tmp_path / "fresh")
    run.save_args({"lr": 1.0})
    atomic_write_json(tmp_path / "fresh" / "summary.json", {"ok": 1})
    model = minirl.load_model(tiny_model_dir, device="cpu")
    tok = minirl.load_tokenizer(tiny_model_dir)
    minirl.save_model(model, tmp_path / "fresh" / "final", tokenizer=tok)
    run.save_checkpoint(1, model, tok, MasterAdamW(model.parameters(), lr=1e-3))
    run.log({"step": 1})
    run.truncate_metrics(1)
    assert mode(tmp_path / "fresh" / "args.json") == file_mode
    assert mode(tmp_path / "fresh" / "summary.json") == file_mode
    assert mode(run.metrics_path) == file_mode
    final = tmp_path / "fresh" / "final"
    assert mode(final) == dir_mode
    for name in os.listdir(final):
        assert mode(final / name) == file_mode, name
    c = os.path.join(run.ckpt_root, "step_000001")
    assert mode(c) == dir_mode and mode(os.path.join(c, "model")) == dir_mode
    for name in ("trainer_state.pt", "manifest.json", "model/model.safetensors", "model/config.json"):
        assert mode(os.path.join(c, name)) == file_mode, name
    # Replacing a file keeps the mode its owner gave it.
    os.chmod(tmp_path / "fresh" / "args.json", 0o640)
    run.save_args({"lr": 2.0})
    assert mode(tmp_path / "fresh" / "args.json") == 0o640
    with AtomicDir(tmp_path / "fresh" / "final") as tmp:
        open(os.path.join(tmp, "x"), "w").close()
    assert mode(final) == dir_mode and os.listdir(final) == ["x"]
    assert not [n for n in os.listdir(tmp_path / "fresh") if n.startswith(".tmp-")]


# ---------------------------------------------------------------- output folders


def test_check_out_dir(tmp_path):
    with pytest.raises(MinirlError, match=r"^--out /proc/x/run: cannot write there"):
        check_out_dir("/proc/x/run", resume=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(MinirlError, match=r"^--out .*file/run: cannot write there"):
        check_out_dir(str(tmp_path / "file" / "run"), resume=False)
    with pytest.raises(MinirlError, match=r"^--save-dir .*file: exists and is not a folder"):
        check_out_dir(str(tmp_path / "file"), resume=False, flag="--save-dir")
    new = tmp_path / "a" / "b" / "run"
    check_out_dir(str(new), resume=False)
    assert not os.path.exists(tmp_path / "a")  # the probe leaves nothing behind
    RunDir(new).log({"step": 1})
    with pytest.raises(MinirlError, match="already holds a run; pass --resume"):
        check_out_dir(str(new), resume=False)
    check_out_dir(str(new), resume=True)
    assert sorted(os.listdir(new)) == ["checkpoints", "metrics.jsonl"]
    # A run killed before its first metrics line is a run too; an empty folder is not.
    for leftover in ("args.json", "final/", "checkpoints/step_000002/"):
        other = tmp_path / leftover.strip("/").replace("/", "_")
        os.makedirs(other / leftover if leftover.endswith("/") else other, exist_ok=True)
        if not leftover.endswith("/"):
            (other / leftover).write_text("{}")
        with pytest.raises(MinirlError, match="already holds a run"):
            check_out_dir(str(other), resume=False)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    check_out_dir(str(tmp_path / "empty"), resume=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_check_writable_dir_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MinirlError, match="cannot write there"):
            check_writable_dir(ro / "run", "--out")
        with pytest.raises(MinirlError, match="cannot write there"):
            check_writable_dir(ro, "--out")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- import guard


def test_running_beside_the_clone_says_why_import_fails(tmp_path):
    """A folder holding the cloned repository as minirl/: Python imports the clone's folder,
    not the package (with `pip install -e .` it used to become an empty namespace package:
    "module 'minirl' has no attribute 'load_model'"). The import now fails with one line."""
    (tmp_path / "minirl").symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import minirl; minirl.load_model"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: 'import minirl' found the cloned repository's folder")
    assert f"run from inside the clone (cd {tmp_path / 'minirl'})" in last
    # A clone under another name, or the clone itself as the working folder: imports normally.
    (tmp_path / "minirl").unlink()
    (tmp_path / "minirl-main").symlink_to(ROOT, target_is_directory=True)
    for cwd in (tmp_path, ROOT):
        proc = subprocess.run([sys.executable, "-c", "import minirl; print(minirl.load_model.__name__)"],
                              cwd=cwd, capture_output=True, text=True, timeout=60,
                              env={**env, "PYTHONPATH": ROOT})
        assert proc.returncode == 0 and proc.stdout.strip() == "load_model", proc.stderr


# ---------------------------------------------------------------- end to end: train_grpo.py


def run_script(script, *flags, umask=None, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def grpo_flags(out):
    """4 steps of the demo preset on the bundled model, checkpoints at steps 2 and 4."""
    return ["--steps", 4, "--prompts-per-step", 4, "--num-samples", 4, "--max-new-tokens", 32,
            "--train-problems", 64, "--eval-problems", 8, "--eval-samples", 2, "--eval-every", 0,
            "--save-every", 2, "--keep-last", 3, "--out", out]


def run_metrics(out):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
            for m in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """One uninterrupted run, made under umask 022."""
    out = tmp_path_factory.mktemp("grpo") / "straight"
    run_script("train_grpo.py", *grpo_flags(out), umask=0o022)
    return out


def test_grpo_outputs_readable_under_umask_022(grpo_run):
    for name in ("args.json", "summary.json", "metrics.jsonl"):
        assert mode(grpo_run / name) == 0o644, name
    for folder in (grpo_run / "final", grpo_run / "checkpoints" / "step_000004"):
        for root, dirs, files in os.walk(folder):
            assert mode(root) == 0o755, root
            for name in files:
                assert mode(os.path.join(root, name)) == 0o644, os.path.join(root, name)


@pytest.mark.parametrize("damage", ["weights", "trainer_state"])
def test_grpo_resume_after_damage_equals_uninterrupted_run(grpo_run, tmp_path, damage):
    """The latest checkpoint damaged, metrics.jsonl torn mid-line and a save's leftover
    .tmp-* folder: --resume falls back to step 2 and ends exactly as the straight run."""
    out = tmp_path / "damaged"
    shutil.copytree(grpo_run, out)
    latest = out / "checkpoints" / "step_000004"
    truncate(latest / ("model/model.safetensors" if damage == "weights" else "trainer_state.pt"))
    shutil.copytree(latest, out / "checkpoints" / ".tmp-step_000006-k1ll3d")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward_mean": 0.')
    run_script("train_grpo.py", *grpo_flags(out), "--resume")
    assert run_metrics(out) == run_metrics(grpo_run)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000004"]
    assert verify_checkpoint(str(latest)) is None
    for name in ("model.safetensors", "config.json"):
        assert open(out / "final" / name, "rb").read() == open(grpo_run / "final" / name, "rb").read()


# ---------------------------------------------------------------- end to end: evaluate.py sample


def sample_flags(model, out, **over):
    flags = {"--model": model, "--task": "arithmetic", "--task-levels": "1,2", "--num-problems": 5,
             "--n": 4, "--max-new-tokens": 12, "--template": "raw", "--chunk-problems": 2, "--seed": 5,
             "--out": out}
    flags.update(over)
    return ["sample"] + [str(x) for kv in flags.items() for x in kv]


def test_sample_torn_chunk_dropped_and_file_completed(tiny_model_dir, tmp_path):
    full = tmp_path / "full.jsonl"
    run_script("evaluate.py", *sample_flags(tiny_model_dir, full), umask=0o022)
    assert mode(full) == 0o644 and mode(tmp_path / "full.settings.json") == 0o644
    data = open(full, "rb").read()
    lines = data.splitlines(keepends=True)
    assert len(lines) == 20  # 5 problems x 4 samples; the last chunk holds one problem
    # Killed while writing the third chunk: two whole chunks, then half a line.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:16]) + lines[16][:len(lines[16]) // 2])
    shutil.copy(tmp_path / "full.settings.json", tmp_path / "cut.settings.json")
    proc = run_script("evaluate.py", *sample_flags(tiny_model_dir, cut))
    assert "4/5 problems already sampled" in proc.stdout
    assert open(cut, "rb").read() == data
    # A complete file is left as it is (its short last chunk counts as whole).
    proc = run_script("evaluate.py", *sample_flags(tiny_model_dir, cut))
    assert "5/5 problems already sampled" in proc.stdout and open(cut, "rb").read() == data
    # A torn line before the last is damage, not an interruption: file and line named.
    cut.write_bytes(b"".join(lines[:3]) + lines[3][:20] + b"\n" + b"".join(lines[4:]))
    proc = run_script("evaluate.py", *sample_flags(tiny_model_dir, cut), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {cut}:4: not valid JSON"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


BAD_SAMPLE_FLAGS = [
    ({"--temperature": -1}, "--temperature must be a finite number >= 0"),
    ({"--temperature": "nan"}, "--temperature must be a finite number >= 0"),
    ({"--top-p": 0}, "--top-p must be in (0, 1]"),
    ({"--top-p": 1.5}, "--top-p must be in (0, 1]"),
    ({"--top-k": -1}, "--top-k must be >= 0"),
    ({"--n": 0}, "--n must be >= 1"),
    ({"--max-new-tokens": 0}, "--max-new-tokens must be >= 1"),
    ({"--chunk-problems": 0}, "--chunk-problems must be >= 1"),
    ({"--num-problems": 0}, "--num-problems must be >= 1"),
    ({"--limit": 0}, "--limit must be >= 1"),
    ({"--template": "nope"}, "--template 'nope'"),
    ({"--dtype": "fp8"}, "--dtype: unknown dtype"),
    ({"--device": "gpu7"}, "--device 'gpu7': not a device"),
    ({"--task-levels": "1,x"}, "--task-levels '1,x'"),
    ({"--out": "/proc/x/s.jsonl"}, "--out /proc/x/s.jsonl: cannot write there"),
]


def test_sample_flag_checks(tiny_model_dir, tmp_path):
    """evaluate.check_sample_args on every bad flag (the subprocess test below runs a few)."""
    sys.path.insert(0, ROOT)
    try:
        import evaluate
    finally:
        sys.path.remove(ROOT)
    for flags, message in BAD_SAMPLE_FLAGS:
        args = evaluate.build_parser().parse_args(sample_flags(tiny_model_dir, tmp_path / "o" / "s.jsonl", **flags))
        with pytest.raises(MinirlError) as e:
            evaluate.check_sample_args(args)
        assert message in str(e.value) and "\n" not in str(e.value)
    evaluate.check_sample_args(evaluate.build_parser().parse_args(sample_flags(tiny_model_dir, tmp_path / "o" / "s.jsonl")))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,message", [
    ({"--temperature": -1}, "--temperature must be a finite number >= 0"),
    ({"--top-p": 1.5}, "--top-p must be in (0, 1]"),
    ({"--max-new-tokens": 500}, "exceed the model's context (128)"),
    ({"--out": "/proc/x/s.jsonl"}, "--out /proc/x/s.jsonl: cannot write there"),
], ids=["temperature", "top-p", "context", "unwritable-out"])
def test_sample_bad_flags_one_line_before_any_work(tiny_model_dir, tmp_path, flags, message):
    """Checked before the model loads (its weights here are garbage, so loading them would
    fail differently) and before anything is written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "out" / "s.jsonl"
    proc = run_script("evaluate.py", *sample_flags(model, out, **flags), check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_refused_sample_leaves_nothing_that_blocks_the_fixed_command(tiny_model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = run_script("evaluate.py", *sample_flags(tiny_model_dir, out, **{"--temperature": -1}), check=False)
    assert proc.returncode == 2 and os.listdir(tmp_path) == []
    run_script("evaluate.py", *sample_flags(tiny_model_dir, out))
    assert len(open(out).readlines()) == 20
