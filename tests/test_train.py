"""train.py: schedules, config validation and files, and real training runs."""
import copy
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import activations as acts
import train
from sae import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw):
    return train.Config(**kw)


def test_k_schedule_linear_with_cold_boot():
    c = cfg(top_k=10, initial_k=50, k_cold_booting_steps=10, k_warmup_steps=20)
    ks = [train.k_at(s, c, 100) for s in (0, 9, 10, 15, 20, 29, 30, 99)]
    # hold 50 for 10 steps, then 50 - 40 * p rounded up, p = (s - 10) / 20
    assert ks == [50, 50, 50, 40, 30, 12, 10, 10]


def test_k_schedule_exponential_and_fractions():
    c = cfg(top_k=10, initial_k=50, k_warmup_steps=0.5, k_schedule_type="exponential",
            k_exponential_factor=3.0)
    # warmup = 0.5 of 40 steps = 20 steps; k = 50 - 40 (1 - e^{-3p}) / (1 - e^{-3}), p = s / 20:
    # s=5: 50 - 40 * 0.5276 / 0.9502 = 27.79 -> 28; s=10: 50 - 40 * 0.7769 / 0.9502 = 17.30 -> 18
    assert [train.k_at(s, c, 40) for s in (0, 5, 10, 20, 39)] == [50, 28, 18, 10, 10]
    assert train.k_at(0, cfg(top_k=7), 40) == 7     # no initial_k: constant


def test_lr_schedule():
    c = cfg(lr=1.0, lr_warmup_steps=10, lr_decay_steps=0.2, lr_end_ratio=1 / 32)
    assert train.lr_at(0, c, 100) == pytest.approx(0.1)
    assert train.lr_at(9, c, 100) == pytest.approx(1.0)
    assert train.lr_at(50, c, 100) == 1.0
    assert train.lr_at(79, c, 100) == pytest.approx(1.0)           # 20 after it: decay starts
    assert train.lr_at(89, c, 100) == pytest.approx(1 / 32 + (1 - 1 / 32) * 0.5)
    assert train.lr_at(99, c, 100) == pytest.approx(1 / 32)        # the last step: lr / 32
    # unset, the lr is the act_fn's: batchtopk's, 2e-3, also when --act-fn comes after the defaults
    # were made (tyro builds the Config from a default one, whose act_fn is topk)
    assert [c.learning_rate for c in train.parse_args(["--act-fn", "topk", "batchtopk", "relu"])] == [1e-3, 2e-3, 1e-3]
    assert train.parse_args(["--act-fn", "batchtopk", "--lr", "5e-4"])[0].learning_rate == 5e-4
    assert train.lr_at(40, cfg(act_fn="batchtopk"), 100) == 2e-3


def run_train(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run folder as a stopped run leaves it, with checkpoints: the tests of bad settings run into
    it (never into the checkout's results/), and each setting must be reported as such before the
    run folder is looked at."""
    out = tmp_path_factory.mktemp("interrupted")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step_000000003.pt").write_bytes(b"a checkpoint")
    return str(out)


@pytest.mark.parametrize("args,message", [
    (["--act-fn", "gelu"], "act-fn"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "4608"], "must be below d_sae"),
    (["--top-k", "4608", "--hook-point-in", "blocks.3.hook_mlp_out"], "must be below d_sae"),
    (["--top-k", "4608", "--hook-point-in", "blocks.3.ln2.hook_normalized"], "must be below d_sae"),
    (["--hook-point-in", "blocks.99.hook_resid_post"], "blocks.15.hook_resid_post"),
    (["--hook-point-in", "blocks.3.hook_nonsense"], "is not one of this model's"),
    (["--dataset", "./no/such/folder"], "does not exist"),
    (["--batch-size", "1000", "--buffer-size", "1500"], "at least two batches"),
    (["--max-norm-ratio", "0.5"], "--max-norm-ratio must be > 1"),
    (["--sparsity-coefficient", "-1"], "--sparsity-coefficient must be >= 0"),
    (["--model-batch-contexts", "0"], "--model-batch-contexts must be >= 1"),
    (["--log-frequency", "0"], "--log-frequency must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--eval-tokens", "100"], "must hold at least one context"),
    (["--initial-k", "5000"], "must be below d_sae"),
    (["--act-fn", "relu", "--initial-k", "128"], "--initial-k does nothing with --act-fn relu"),
    (["--context-size", "100000", "--eval-tokens", "200000"], "longer than SmolLM2-135M-Instruct takes"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["--device", "gpu"], "not a device name"),
    (["--model", "nobody/no-such-model"], "model 'nobody/no-such-model' cannot be read"),
    (["--dataset", "nobody/no-such-dataset"], "dataset 'nobody/no-such-dataset' cannot be read"),
])
def test_bad_input_fails_fast_with_one_line(args, message, interrupted_run):
    # (offline: a name the hub lacks is refused at once, not after the hub's retries)
    r = run_train(*args, "--exp-result-path", interrupted_run, timeout=120,
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2
    assert message in r.stderr
    assert "Loading weights" not in r.stderr and "Traceback" not in r.stderr


def test_wandb_without_a_login_fails_before_the_model_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    r = subprocess.run([sys.executable, "train.py", "--wandb-project", "p", "--exp-result-path",
                        str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env, "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)})
    assert r.returncode == 2 and "W&B cannot start" in r.stderr and "WANDB_MODE=offline" in r.stderr
    assert "Loading weights" not in r.stderr and "Traceback" not in r.stderr


def test_a_wrong_text_column_fails_before_the_model_loads(tmp_path, interrupted_run):
    (tmp_path / "a.jsonl").write_text('{"content": "It is a truth universally acknowledged."}\n')
    r = run_train("--dataset", str(tmp_path), "--exp-result-path", interrupted_run, timeout=60)
    assert r.returncode == 2 and "has no key 'text'" in r.stderr and "--text-column" in r.stderr
    assert "Loading weights" not in r.stderr and "Traceback" not in r.stderr
    r = run_train("--exp-result-path", "README.md", timeout=60)
    assert r.returncode == 2 and "--exp-result-path README.md: not a folder" in r.stderr


def test_batch_size_must_divide_over_processes(tmp_path):
    r = run_train("--batch-size", "1001", "--exp-result-path", str(tmp_path),
                  env={"WORLD_SIZE": "2", "RANK": "0"}, timeout=60)
    assert r.returncode == 2 and "not divisible by the 2 processes" in r.stderr


def test_lm_batch_default_depends_on_the_device():
    """16 contexts per LM forward on CPU; on a GPU as many as hold 8,192 tokens (at least 16)."""
    assert train.parse_args([])[0].lm_batch("cpu") == 16
    assert train.parse_args([])[0].lm_batch("cuda:1") == 8192 // 128
    assert train.parse_args(["--context-size", "1024"])[0].lm_batch("cuda") == 16
    assert train.parse_args(["--model-batch-contexts", "4"])[0].lm_batch("cuda") == 4


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_memory_is_reused_not_faulted_in_again():
    """A 64 MB tensor made and freed 20 times: without keep_freed_memory() each one faults its
    16k pages in anew; with it, after a few rounds the heap hands the freed block back."""
    code = """if True:
        import resource, torch, sae
        def faults():                     # page faults of the last 5 of 20 rounds
            for i in range(20):
                if i == 15:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                torch.empty(16 * 2 ** 20).fill_(1.0)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        before = faults()
        sae.keep_freed_memory()
        print(before, faults())"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    before, after = map(int, r.stdout.split())
    assert after < 500 and after < before / 10, (before, after)   # before: ~82k (4 KB pages)


@pytest.mark.parametrize("transcoder", [False, True])
def test_fused_adam_over_the_sae_param_groups_is_plain_adam(transcoder):
    """train.py's optimizer, fused Adam over the groups SAE.param_groups gives (the thresholds' lr
    scaled by their factor each step, as the loop does), takes the same three steps as plain
    single-tensor Adam on a copy, whose thresholds get their own lr."""
    torch.manual_seed(0)
    sae = SAE(16, 64, "jumprelu", 4, d_out=8 if transcoder else None, transcoder=transcoder,
              jumprelu_init_threshold=0.05)
    ref = copy.deepcopy(sae)
    opt = torch.optim.Adam(sae.param_groups(0.1), lr=1e-2, fused=True)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in sae.parameters()}
    ref_opt = torch.optim.Adam([{"params": [p for n, p in ref.named_parameters() if n != "log_threshold"]},
                                {"params": [ref.log_threshold], "lr": 1e-3}], lr=1e-2, foreach=False)
    x = torch.randn(32, 16)
    for model, o in ((sae, opt), (ref, ref_opt)):
        for _ in range(3):
            if o is opt:
                for group in o.param_groups:
                    group["lr"] = 1e-2 * group.get("lr_factor", 1.0)
            o.zero_grad(set_to_none=True)
            y_hat, code = model(x)
            ((y_hat - x[:, :model.d_out]).pow(2).sum(-1).mean() + model.sparsity_loss(code, "tanh")).backward()
            assert all(p.grad is None or p.grad.is_contiguous() for p in model.parameters())
            o.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(sae, name), p, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(sae.log_threshold, ref.log_threshold.new_full((64,), __import__("math").log(0.05)))


def test_gradient_clipping_caps_a_spike_at_the_ratio_of_the_running_mean():
    """clip_gradients_: a step's gradient norm is capped at ratio x the running geometric mean of
    the (clipped) norms before it; a norm below the cap passes unchanged; the first step sets the
    mean."""
    sae = SAE(8, 32, "batchtopk", 4)
    m = train.Member(cfg(act_fn="batchtopk"), "", "", sae, None, (slice(0, 8), slice(0, 8)))
    params = list(sae.parameters())

    def step(norm):              # gradients of total norm `norm`, then clipped: their norm after
        for p in params:
            p.grad = torch.ones_like(p)
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad *= norm / total
        train.clip_gradients_(m, 3.0)
        return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()

    assert step(2.0) == pytest.approx(2.0) and m.log_grad_norm.item() == pytest.approx(math.log(2.0))
    assert step(5.0) == pytest.approx(5.0)                              # below 3 x the mean: as is
    mean = 0.9 * math.log(2.0) + 0.1 * math.log(5.0)
    assert m.log_grad_norm.item() == pytest.approx(mean)
    assert step(2000.0) == pytest.approx(3 * math.exp(mean), rel=1e-5)  # a spike: capped
    assert m.log_grad_norm.item() == pytest.approx(0.9 * mean + 0.1 * (mean + math.log(3.0)))
    # unset, the ratio is the act_fn's: off for topk, 3 for the others; 0 turns it off
    assert [c.clip_ratio for c in train.parse_args(["--act-fn", "topk", "batchtopk", "relu"])] == [0, 3.0, 3.0]
    assert train.parse_args(["--act-fn", "batchtopk", "--grad-clip-ratio", "0"])[0].clip_ratio == 0


def test_config_file_and_flags(tmp_path):
    (tmp_path / "run.toml").write_text('act_fn = "batchtopk"\ntop_k = 16\nlr = 0.002\n')
    c = train.parse_args(["--config", str(tmp_path / "run.toml"), "--lr", "3e-4"])[0]
    assert (c.act_fn, c.top_k, c.lr) == ("batchtopk", 16, 3e-4)
    (tmp_path / "bad.yaml").write_text("act_fn: topk\ntop_kk: 16\n")
    with pytest.raises(ValueError, match="top_kk"):
        train.parse_args(["--config", str(tmp_path / "bad.yaml")])[0]
    (tmp_path / "bad.json").write_text('{"top_k": "many"}')
    with pytest.raises(ValueError, match="top_k"):
        train.parse_args(["--config", str(tmp_path / "bad.json")])[0]


@pytest.mark.xdist_group("embedded_run")    # one worker trains it, for both tests
def test_short_real_run_on_the_embedded_model(trained_run):
    """A real run on SmolLM2 and the bundled Austen text: the loss goes down, the saved folder
    loads back, and held-out metrics are written."""
    out, res = trained_run
    lines = [json.loads(l) for l in open(out / "log.jsonl")]
    assert len(lines) == 6 and lines[-1]["mse"] < 0.7 * lines[0]["mse"]
    assert res["l0"] == pytest.approx(64, rel=0.1)      # held out: k on average over training batches
    assert res["explained_variance"] > 0.8
    sae = SAE.load(out)
    assert sae.act_fn == "batchtopk" and sae.d_in == 576 and sae.d_sae == 8 * 576
    # BatchTopK -> JumpReLU, measured on the same held-out tokens of the real model
    # (48 steps leave the threshold still moving: L0 within 30% here; the default 781-step run
    # lands within 3% of k)
    conv = res["jumprelu"]
    assert abs(conv["l0"] - 64) < 0.3 * 64 and abs(conv["explained_variance"] - res["explained_variance"]) < 0.02
    assert SAE.load(out / "jumprelu").act_fn == "jumprelu"
    saved = json.load(open(out / "eval.json"))
    assert saved["tokens"] == res["tokens"] > 3000
    # the resolved config is itself a valid --config that reproduces the run's settings
    again = train.parse_args(["--config", str(out / "train_config.json")])[0]
    saved = json.load(open(out / "train_config.json"))
    assert saved["model_dtype"] in ("float32", "bfloat16") and saved["amp_dtype"] != "auto"   # the choice
    assert train.run_config(again) == {k: v for k, v in saved.items() if k != "code"}
    # ... and records the code it ran: the files' hash, and this checkout's commit
    assert len(saved["code"]["files_sha256"]) == 64
    if os.path.isdir(os.path.join(ROOT, ".git")):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert saved["code"]["git_commit"] == head and isinstance(saved["code"]["git_dirty"], bool)


def test_transcoder_trains_from_mlp_input_to_mlp_output(tiny_model_path, tmp_path):
    out = tmp_path / "tc"
    res = train.main(cfg(model=tiny_model_path, model_dtype="float32", device="cpu",
                         hook_point_in="blocks.1.ln2.hook_normalized", hook_point_out="blocks.1.hook_mlp_out",
                         context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8,
                         batch_size=256, buffer_size=2048, total_training_tokens=256 * 30,
                         log_frequency=10, exp_result_path=str(out)))
    sae = SAE.load(out)
    assert sae.transcoder and sae.d_in == sae.d_out == 32
    lines = [json.loads(l) for l in open(out / "log.jsonl")]
    assert lines[-1]["mse"] < lines[0]["mse"]
    assert res["l0"] == 8 and res["explained_variance"] > 0


def test_the_sae_starts_from_its_seed_whatever_loading_the_lm_draws(tiny_model_path, tmp_path, monkeypatch):
    # from a cache with --eval-every only rank 0 loads the LM before the SAE is made: an LM whose
    # loading draws random numbers must not give that rank another SAE
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
            buffer_size=1024, total_training_tokens=256 * 2, exp_result_path=str(tmp_path / "a"))
    train.main(c)
    load_lm = train.load_lm
    monkeypatch.setattr(train, "load_lm", lambda *a: (torch.rand(3), load_lm(*a))[1])
    train.main(dataclasses.replace(c, exp_result_path=str(tmp_path / "b")))
    a, b = (SAE.load(tmp_path / run).state_dict() for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_stops_with_one_line_and_keeps_its_checkpoints(tiny_model_path, tmp_path):
    out = tmp_path / "nan"
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
            buffer_size=2048, total_training_tokens=256 * 30, log_frequency=10, exp_result_path=str(out),
            checkpoint_every=1, lr=1e18, lr_warmup_steps=8)     # overflows after a few steps
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(FloatingPointError, match=r"nan or inf at step (\d+): lower --lr") as e:
        train.main(c)
    assert signal.getsignal(signal.SIGINT) is handler           # the caller's Ctrl-C is back
    at = int(re.search(r"step (\d+)", str(e.value)).group(1))
    saved = sorted(os.listdir(out / "checkpoints"))
    assert at > 1 and saved[-1] == f"step_{at - 1:09d}.pt"     # none of the nan weights
    ckpt = torch.load(out / "checkpoints" / saved[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["saes"][0]["sae"].values())


def test_a_run_that_stays_broken_stops_but_a_spike_does_not_stop_it(tiny_model_path, tmp_path, monkeypatch):
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
            buffer_size=1024, total_training_tokens=256 * 40, log_frequency=5, checkpoint_every=5,
            exp_result_path=str(tmp_path / "lr1"), lr=1.0)       # EV far below -1 from the first window on
    with pytest.raises(FloatingPointError, match=r"the run diverges at step 15 .*lower --lr"):
        train.main(c)
    assert sorted(os.listdir(tmp_path / "lr1" / "checkpoints"))[-1] == "step_000000010.pt"
    # a healthy run whose windows spike past the bounds twice in a row (as a batch with a massive
    # activation does) goes on
    read, n = acts.Stats.read, []

    def spiky(self, *args):
        r = read(self, *args)
        n.append(1)
        return {**r, "explained_variance": -5.0} if len(n) in (2, 3, 5) else r
    monkeypatch.setattr(acts.Stats, "read", spiky)
    res = train.main(dataclasses.replace(c, lr=5e-4, exp_result_path=str(tmp_path / "ok")))
    assert res["l0"] == 8 and len(n) >= 8            # (the evaluation reads Stats too)


def test_a_signal_during_a_buffer_refill_checkpoints_the_steps_done_without_finishing_it(
        tiny_model_path, tmp_path, monkeypatch):
    # SIGTERM while the stream reads the LM to refill its buffer: the refill is abandoned, the
    # checkpoint holds the steps done at the last batch's position, and the resumed run ends where
    # an uninterrupted one does.
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
            buffer_size=1024, total_training_tokens=256 * 30, log_frequency=10,
            exp_result_path=str(tmp_path / "whole"))
    train.main(c)
    real, read = train.lm_chunks, []

    def chunks(*args):
        for item in real(*args):
            read.append(1)
            if len(read) == 12:
                os.kill(os.getpid(), signal.SIGTERM)   # arrives inside next(batches)
            yield item
    monkeypatch.setattr(train, "lm_chunks", chunks)
    cut = dataclasses.replace(c, exp_result_path=str(tmp_path / "cut"))
    stopped = train.main(cut)["stopped_at"]
    assert len(read) == 12 and 0 < stopped < 30         # nothing read after the signal
    assert os.listdir(tmp_path / "cut" / "checkpoints") == [f"step_{stopped:09d}.pt"]
    monkeypatch.setattr(train, "lm_chunks", real)
    train.main(dataclasses.replace(cut, resume=str(tmp_path / "cut")))
    a, b = (load_file(str(tmp_path / d / "sae.safetensors")) for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_data_deep_in_a_run_keeps_the_steps_done_and_the_run_resumes(tiny_model_path, tmp_path):
    import gzip
    import activations as acts
    with gzip.open(os.path.join(acts.EMBEDDED_DATASET_DIR, "persuasion.txt.gz"), "rt") as f:
        paragraphs = [p for p in f.read().split("\n\n") if len(p) > 200][:300]
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    lines = [json.dumps({"text": p}) for p in paragraphs]
    (data / "a.jsonl").write_text("\n".join(lines + ['{"text": "broken']) + "\n")
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            dataset=str(data), context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8,
            batch_size=256, buffer_size=1024, total_training_tokens=256 * 200, log_frequency=10,
            exp_result_path=str(out))
    with pytest.raises(ValueError, match=r"line 301: not JSON .*checkpoint written at step (\d+)") as e:
        train.main(c)
    at = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert at > 20 and os.listdir(out / "checkpoints") == [f"step_{at:09d}.pt"]
    (data / "a.jsonl").write_text("\n".join(lines + [json.dumps({"text": "mended"})]) + "\n")
    res = train.main(dataclasses.replace(c, resume=str(out)))
    assert res["l0"] == 8


def test_a_resumed_run_logs_each_step_once(tiny_model_path, tmp_path):
    # resumed from step 10 of a finished 20-step run: the log's lines after step 10 are replaced
    c = cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
            context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
            buffer_size=1024, total_training_tokens=256 * 20, log_frequency=1, checkpoint_every=5,
            keep_checkpoints=10, exp_result_path=str(tmp_path))
    train.main(c)
    train.main(dataclasses.replace(c, resume=str(tmp_path / "checkpoints" / f"step_{10:09d}.pt")))
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == list(range(1, 21))


def test_eval_only_takes_the_runs_config_with_flags_over_it(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    os.makedirs(out / "jumprelu")                   # as an earlier batchtopk run into this folder left it
    (out / "jumprelu" / "sae.safetensors").write_bytes(b"")
    train.main(cfg(model=tiny_model_path, model_dtype="float32", device="cpu", hook_point_in="blocks.1.hook_resid_post",
                   context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
                   buffer_size=1024, total_training_tokens=256 * 4, exp_result_path=str(out)))
    assert not os.path.exists(out / "jumprelu")     # not beside this topk SAE, as if it were its conversion
    res = train.eval_only(train.parse_args(["--eval-only", str(out), "--eval-tokens", "512"])[0])
    assert res["tokens"] == 512 - 512 // 64 and res["l0"] == 8      # 8 contexts, BOS dropped
    # the run held out 16 contexts of 64, 1008 tokens of text: more, or longer contexts, read text it
    # trained on, as would the held-out tokens of other data
    for flags in (["--eval-tokens", "2048"], ["--context-size", "128"]):
        with pytest.raises(ValueError, match="held out only its first 1008"):
            train.eval_only(train.parse_args(["--eval-only", str(out), *flags])[0])
    with pytest.raises(ValueError, match="give it as --eval-dataset"):
        train.eval_only(train.parse_args(["--eval-only", str(out), "--dataset", str(tmp_path)])[0])
    with monkeypatch.context() as m:                  # held-out text that cannot be read: before the LM loads
        m.setattr(train, "load_lm", lambda *a: pytest.fail("the LM loaded"))
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="holds no .txt"):
            train.eval_only(train.parse_args(["--eval-only", str(out), "--eval-dataset", str(tmp_path / "empty")])[0])
    SAE(32, 64, "topk", 8).save(str(tmp_path / "bare"))               # no run config: the flags say
    bare = train.parse_args(["--eval-only", str(tmp_path / "bare"), "--model", tiny_model_path, "--hook-point-in",
                             "blocks.0.hook_resid_post", "--model-dtype", "float32", "--eval-tokens", "256",
                             "--context-size", "64", "--device", "cpu"])[0]
    assert train.eval_only(bare)["tokens"] == 256 - 4


def test_the_bundled_text_is_recorded_by_name_and_read_from_any_directory(tmp_path, monkeypatch):
    """Configs, checkpoints and caches record the bundled text as data/austen, not this checkout's
    absolute path, and the name reads it from any working directory: another checkout (or this one,
    moved) resumes a run, evaluates an SAE, or trains from a cache made here."""
    import gzip
    import activations as acts
    monkeypatch.chdir(tmp_path)                       # no data/ here
    c = train.Config(exp_result_path=str(tmp_path / "run"))        # validates the dataset from here
    assert train.run_config(c)["dataset"] == "data/austen"
    files = sorted(f for f in os.listdir(acts.EMBEDDED_DATASET_DIR) if f.endswith(".txt.gz"))
    with gzip.open(os.path.join(acts.EMBEDDED_DATASET_DIR, files[0]), "rt", encoding="utf-8") as f:
        assert next(acts.iter_texts(c.dataset)) == f.read()


def test_auto_dtypes_pick_bf16_only_where_it_is_native(monkeypatch, capsys):
    """--model-dtype / --amp-dtype auto: bfloat16 on a device that computes it natively, else
    float32, printed; an explicit value is obeyed. native_bf16 follows the CPU's flags."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert acts.native_bf16("cpu") == any(f in flags.split() for f in ("amx_tile", "amx_bf16", "avx512_bf16"))
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(acts, "native_bf16", lambda device: native)
        c = train.resolve_dtypes([cfg()], "cpu")[0]
        assert (c.model_dtype, c.amp_dtype) == (want, want) and f"LM forward {want}" in capsys.readouterr().out
        c = train.resolve_dtypes([cfg(model_dtype="float16", amp_dtype="float32")], "cpu")[0]
        assert (c.model_dtype, c.amp_dtype) == ("float16", "float32")


REFERENCE_TOML = '''sae_name = "pythia-160m-sae"
sae_series = "pythia-sae"
model_name = "pythia-160m"
device_type = "cuda"
[sae]
sae_type = "sae"
hook_point_in = "blocks.6.hook_resid_post"
hook_point_out = "blocks.6.hook_resid_post"
d_model = 768
expansion_factor = 8
act_fn = "relu"
dtype = "torch.float32"
device = "cuda"
[initializer]
grid_search_init_norm = true
[trainer]
amp_dtype = "torch.float32"
lr = 0.0001
total_training_tokens = 800_000_000
log_frequency = 1000
exp_result_path = "results"
[model]
model_name = "EleutherAI/pythia-160m"
device = "cuda"
dtype = "torch.float16"
[datasets."SlimPajama-3B"]
dataset_name_or_path = "Hzfinfdu/SlimPajama-3B"
[activation_factory]
target = "activations-1d"
hook_points = ["blocks.6.hook_resid_post"]
batch_size = 4096
buffer_size = 16384
[[activation_factory.sources]]
type = "dataset"
name = "SlimPajama-3B"
[activation_factory.buffer_shuffle]
perm_seed = 42
generator_device = "cuda"
'''


def test_the_reference_systems_train_config_toml_runs(tmp_path):
    (tmp_path / "ref.toml").write_text(REFERENCE_TOML)
    c, = train.parse_args(["--config", str(tmp_path / "ref.toml")])
    want = dict(model="EleutherAI/pythia-160m", model_dtype="float16", device="cuda", hook_point_in="blocks.6.hook_resid_post",
                hook_point_out="blocks.6.hook_resid_post", expansion_factor=8, act_fn="relu", dtype="float32",
                amp_dtype="float32", grid_search_init_norm=True, lr=1e-4, total_training_tokens=800_000_000,
                log_frequency=1000, exp_result_path="results", dataset="Hzfinfdu/SlimPajama-3B", batch_size=4096,
                buffer_size=16384, perm_seed=42, generator_device="cuda")
    assert {k: getattr(c, k) for k in want} == want
    # a key with no counterpart is named, in one line
    (tmp_path / "bad.toml").write_text(REFERENCE_TOML.replace("[initializer]\n", "[initializer]\ninit_encoder_with_decoder_transpose = true\n"))
    with pytest.raises(ValueError, match=r"no counterpart of initializer.init_encoder_with_decoder_transpose$"):
        train.parse_args(["--config", str(tmp_path / "bad.toml")])
    # the same file pointed at the embedded model and text trains
    local = (REFERENCE_TOML.replace('"EleutherAI/pythia-160m"', f'"{acts.EMBEDDED_MODEL}"')
             .replace('"Hzfinfdu/SlimPajama-3B"', f'"{acts.EMBEDDED_DATASET_DIR}"').replace('"cuda"', '"cpu"')
             .replace("blocks.6.", "blocks.2.").replace("torch.float16", "torch.float32")
             .replace("800_000_000", "4096").replace("batch_size = 4096", "batch_size = 512")
             .replace("buffer_size = 16384", "buffer_size = 2048").replace("log_frequency = 1000", "log_frequency = 4")
             .replace('"results"', f'"{tmp_path / "run"}"'))
    (tmp_path / "local.toml").write_text(local)
    c, = train.parse_args(["--config", str(tmp_path / "local.toml"), "--eval-tokens", "1024", "--context-size", "64"])
    res = train.main(c)
    assert res["l0"] > 0 and res["explained_variance"] > 0 and (tmp_path / "run" / "sae.safetensors").exists()
