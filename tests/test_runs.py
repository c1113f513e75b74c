"""Whole runs as real processes on a tiny random Llama (with the real tokenizer and the bundled
text): SIGKILL + resume reproduces the uninterrupted run, SIGTERM checkpoints and exits 0, and a
2-process torchrun (gloo) trains, resumes, and agrees with a 1-process run."""
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(model_path, out, *extra, steps=60):
    return ["--model", model_path, "--hook-point-in", "blocks.1.hook_resid_post",
            "--model-dtype", "float32", "--context-size", "64", "--model-batch-contexts", "4",
            "--eval-tokens", "1024", "--top-k", "8", "--batch-size", "256", "--buffer-size", "1024",
            "--total-training-tokens", str(256 * steps), "--log-frequency", "10",
            "--exp-result-path", str(out), "--device", "cpu", *extra]


def run(argv, torchrun=False, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(random.randint(20000, 40000))] if torchrun else [sys.executable])
    r = subprocess.run(cmd + ["train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def weights(folder):
    return load_file(os.path.join(folder, "sae.safetensors"))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "checkpoints", "step_*.pt")))


def run_folder_in_cmdline(pid: str, out) -> bool:
    """Whether process pid is a live train.py writing into the run folder out."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
    return not zombie and "train.py" in args and str(out) in args


def kill_at_a_checkpoint(argv, out, target, torchrun=False):
    """Start a run, SIGKILL its whole process group once a checkpoint at step >= target exists."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(random.randint(20000, 40000))] if torchrun else [sys.executable])
    p = subprocess.Popen(cmd + ["train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        done = [int(os.path.basename(c)[5:14]) for c in checkpoints(out)]
        if done and max(done) >= target:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    # torchrun starts each worker in a session of its own, out of reach of the group's kill: kill
    # them too, as a scheduler kills a job's every process, and wait until they are gone
    while pids := [pid for pid in os.listdir("/proc") if pid.isdigit() and run_folder_in_cmdline(pid, out)]:
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return max(int(os.path.basename(c)[5:14]) for c in checkpoints(out))


def test_sigkill_then_resume_gives_the_uninterrupted_result(tiny_model_path, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(args_for(tiny_model_path, ref))
    target = random.randint(5, 40)
    at = kill_at_a_checkpoint(args_for(tiny_model_path, cut, "--checkpoint-every", "1"), cut, target)
    assert at < 60 and not os.path.exists(cut / "sae.safetensors")
    r = run(args_for(tiny_model_path, cut, "--checkpoint-every", "1") + ["--resume", str(cut)])
    assert f"resumed from step {at}" in r.stdout
    # Bitwise on CPU: same tokens in the same order, same optimizer and counter state.
    assert max_diff(weights(ref), weights(cut)) == 0.0
    assert len(checkpoints(cut)) == 2                              # only the newest are kept


def wandb_runs(out):
    """Offline W&B run folders of a run: {run id: bytes of its .wandb record file}."""
    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    return [(os.path.basename(f)[4:-6], open(f, "rb").read()) for f in sorted(files)]


def test_sigterm_checkpoints_at_that_step_exits_0_and_resume_continues_wandb(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    argv = args_for(tiny_model_path, out, "--wandb-project", "nanosae-test", steps=150)
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    while not os.path.exists(out / "log.jsonl"):                   # wait for a status line
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    step = int(stdout.split("stopped by a signal at step ")[1].split(";")[0])
    assert step < 150
    assert [os.path.basename(c) for c in checkpoints(out)][-1] == f"step_{step:09d}.pt"
    run(argv + ["--resume", str(out)], env=env)
    # W&B: the resumed run continues the same run id, and the offline records hold the metrics
    # under stable names, once per status line.
    (id1, rec1), (id2, rec2) = wandb_runs(out)
    assert id1 == id2
    n_lines = sum(1 for _ in open(out / "log.jsonl"))
    assert rec1.count(b"train/explained_variance") + rec2.count(b"train/explained_variance") >= n_lines
    assert b"train/l0" in rec2 and b"eval/explained_variance" in rec2
    # ... plotted against our step, a logged value: W&B's own step would drop the lines that a run
    # resumed after a crash logs again (steps after its checkpoint, before the crash)
    assert all(b"train/*" in rec and b"eval/*" in rec for rec in (rec1, rec2))


def test_sigterm_during_an_evaluation_mid_run_checkpoints_without_waiting_for_it(tiny_model_path, tmp_path):
    # a scheduler's kill follows its SIGTERM ~30 s later: a long evaluation must not stand before the
    # checkpoint
    out = tmp_path / "run"
    argv = args_for(tiny_model_path, out, "--eval-every", "10", steps=30)
    argv[argv.index("--eval-tokens") + 1] = "131072"
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    while not os.path.exists(out / "log.jsonl") and p.poll() is None:     # step 10: its evaluation
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "stopped by a signal at step 10" in stdout and "explained_variance" not in stdout  # no table
    assert [os.path.basename(c) for c in checkpoints(out)] == ["step_000000010.pt"]


def test_sigterm_during_the_final_evaluation_says_the_sae_is_saved(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    argv = args_for(tiny_model_path, out, steps=20)
    argv[argv.index("--eval-tokens") + 1] = "65536"                 # an evaluation of a few seconds
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    while not os.path.exists(out / "sae.safetensors") and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert f"the SAE is saved: evaluate it with --eval-only {out}" in stderr and "Traceback" not in stderr
    assert not os.path.exists(out / "eval.json") and len(weights(out)) == 6


def test_resume_errors_are_one_line_and_destroy_nothing(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    run(args_for(tiny_model_path, out, "--checkpoint-every", "20", steps=40))
    before = weights(out)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("Other text to evaluate on.")
    for extra, msg in ((["--resume", str(tmp_path / "nothing")], "no checkpoint"),
                       (["--resume", str(out), "--expansion-factor", "4"], "different run"),
                       (["--resume", str(out), "--max-norm-ratio", "10"], "max_norm_ratio: checkpoint None"),
                       (["--resume", str(out), "--eval-dataset", str(tmp_path / "text")],
                        "eval_dataset: checkpoint None"),
                       ([], "holds checkpoints of another run")):
        r = subprocess.run([sys.executable, "train.py", *args_for(tiny_model_path, out, steps=40), *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "train.py", "--resume", str(corrupt)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot be read" in r.stderr
    assert max_diff(before, weights(out)) == 0 and len(checkpoints(out)) == 2


def test_torchrun_two_processes_train_resume_and_match_one_process(tiny_model_path, tmp_path):
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    run(args_for(tiny_model_path, one))
    run(args_for(tiny_model_path, two), torchrun=True)
    # Ranks assert at the end that their weights are identical; here the result of 2 ranks
    # (each reading its own half of the contexts) must match 1 process with the same global batch.
    res1, res2 = (train.json.load(open(d / "eval.json")) for d in (one, two))
    assert abs(res1["explained_variance"] - res2["explained_variance"]) < 0.03, (res1, res2)
    assert res1["l0"] == res2["l0"] == 8
    # killed mid-run and resumed under torchrun: the same weights as the uninterrupted 2-rank run.
    # Checkpoints by the clock (at 1e-9 minutes, every step): the ranks must agree to save.
    kill_at_a_checkpoint(args_for(tiny_model_path, cut, "--checkpoint-minutes", "1e-9"), cut,
                         random.randint(5, 40), torchrun=True)
    run(args_for(tiny_model_path, cut, "--checkpoint-every", "1", "--resume", str(cut)), torchrun=True)
    assert max_diff(weights(two), weights(cut)) == 0.0


def test_ranks_whose_first_batches_differ_still_start_from_the_same_sae(tiny_model_path, tmp_path):
    """One token per rank and step: the init's grid search on each rank's own token would pick a
    different decoder norm on each rank. The ranks assert at the end that their weights agree."""
    r = run(args_for(tiny_model_path, tmp_path, "--batch-size", "2", "--buffer-size", "4",
                     "--total-training-tokens", "8"), torchrun=True)
    assert "grid search" in r.stdout and os.path.exists(tmp_path / "sae.safetensors")


def test_torchrun_trains_from_a_cache_with_checkpoints(tiny_model_path, tmp_path):
    # each rank reads its half of every shard; checkpoints gather the ranks' buffers to rank 0
    cache, out = tmp_path / "cache", tmp_path / "run"
    run(args_for(tiny_model_path, tmp_path / "x", "--cache-activations", str(cache), steps=30))
    run(args_for(tiny_model_path, out, "--activations", str(cache), "--checkpoint-every", "10", steps=30),
        torchrun=True)
    assert train.json.load(open(out / "eval.json"))["l0"] == 8
    ckpt = train.load_checkpoint(checkpoints(out)[-1])
    assert len(ckpt["data"]) == 2 and ckpt["data"][0]["next_context"] == ckpt["data"][1]["next_context"]
    for buf in (d["mix"]["buf"] for d in ckpt["data"]):   # a compact CPU copy, not a view of the buffer
        assert buf.device.type == "cpu" and buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()


def test_a_resume_writes_into_the_folder_it_was_given(tiny_model_path, tmp_path):
    # a run folder moved (here, copied) and resumed: its checkpoint records the old folder, which a
    # resume must neither rewrite nor prune
    old, new = tmp_path / "old", tmp_path / "new"
    run(args_for(tiny_model_path, old, "--checkpoint-every", "10", steps=20))
    shutil.copytree(old, new)
    os.remove(new / "train_config.json")
    files = sorted(glob.glob(os.path.join(old, "**"), recursive=True))
    before = {f: (os.stat(f).st_mtime_ns, open(f, "rb").read()) for f in files if os.path.isfile(f)}
    r = run(["--resume", str(new)])
    assert "resumed from step 20" in r.stdout
    assert sorted(glob.glob(os.path.join(old, "**"), recursive=True)) == files
    assert {f: (os.stat(f).st_mtime_ns, open(f, "rb").read()) for f in before} == before
    for name in ("train_config.json", "sae.safetensors", "config.json", "eval.json"):
        assert os.stat(new / name).st_mtime_ns > max(m for m, _ in before.values()), name
    assert json.load(open(new / "train_config.json"))["exp_result_path"] == str(new)


def test_a_killed_write_and_a_cut_short_checkpoint_resume_from_the_last_good_one(tiny_model_path, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    argv = args_for(tiny_model_path, cut, "--checkpoint-every", "10")
    run(args_for(tiny_model_path, ref))
    at = kill_at_a_checkpoint(argv, cut, 20)
    *_, good, newest = checkpoints(cut)
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[:len(data) // 2])                    # cut short
    # a process SIGKILLed while it writes the next checkpoint leaves its partial file
    partial = os.path.join(cut, "checkpoints", f"step_{at + 10:09d}.pt")
    code = (f"import time, activations as a; a.write_atomic({partial!r}, "
            "lambda f: (f.write(bytes(4096)), f.flush(), time.sleep(120)))")
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    while not glob.glob(partial + ".*.tmp"):
        assert writer.poll() is None
        time.sleep(0.05)
    writer.kill()
    writer.wait()
    r = run(argv + ["--resume", str(cut)])
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{newest} cannot be read" in warning[0] and good in warning[0], r.stderr[-2000:]
    assert f"resumed from step {at - 10}" in r.stdout
    assert not glob.glob(os.path.join(cut, "**", "*.tmp"), recursive=True)
    assert max_diff(weights(ref), weights(cut)) == 0.0                 # exact, from the good one
    assert [os.path.basename(c) for c in checkpoints(cut)] == ["step_000000050.pt", "step_000000060.pt"]
    # a folder holding only the partial file of a first checkpoint: a new run may use it (and removes
    # the file); --resume finds no checkpoint there
    only = tmp_path / "only"
    os.makedirs(only / "checkpoints")
    (only / "checkpoints" / "step_000000003.pt.4242.tmp").write_bytes(bytes(100))
    assert train.check_run_folder([train.Config(exp_result_path=str(only))], 0, 1) is None
    assert os.listdir(only / "checkpoints") == []


def test_a_second_run_into_a_folder_in_use_stops_at_once_naming_the_first(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    argv = args_for(tiny_model_path, out, "--checkpoint-every", "5", steps=5000)
    first = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while not checkpoints(out):
            assert first.poll() is None
            time.sleep(0.05)
        for extra in ([], ["--resume", str(out)]):                    # a new run, or a resume
            r = subprocess.run([sys.executable, "train.py", *argv, *extra], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 2 and f"is in use by another run (PID {first.pid})" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # killed, the first run holds the folder no longer: the same command now reaches the next check
    r = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds checkpoints of another run" in r.stderr, r.stderr


def test_a_full_disk_stops_with_one_line_and_leaves_no_partial_file(tiny_model_path, tmp_path):
    """A checkpoint that does not fit: on a 3 MB tmpfs filled to its last 64 KB where this process
    may mount one (root), else under a 64 KB file-size limit (the write fails with EFBIG; SIGXFSZ,
    which would kill the process, ignored)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = bool(shutil.which("mount")) and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode == 0

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        if mounted:
            (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - 64 * 1024))
        out = disk / "run"
        r = subprocess.run([sys.executable, "train.py", *args_for(tiny_model_path, out, "--checkpoint-every", "5")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           preexec_fn=None if mounted else file_size_limit)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot write {out / 'checkpoints' / 'step_000000005.pt'}: "
                               + ("no space left on device" if mounted else "file too large")), line
        assert "partial file is removed" in line and "last checkpoint" in line
        assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)
        assert os.path.exists(out / "train_config.json")              # written before it: intact
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])
