"""Sweeps: several SAEs trained on one activation stream. The grid from flags or a config file, bad
grids refused before the model loads, each SAE bitwise the one trained alone, the summary files,
a cache of several hook points, SIGKILL + resume, and a 2-process torchrun sweep."""
import csv
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from sae import SAE
from test_runs import args_for, checkpoints, kill_at_a_checkpoint, max_diff, run, wandb_runs, weights

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_per_sae_flags_with_several_values_make_the_grid():
    cfgs = train.parse_args(["--top-k", "16", "32", "64", "128", "--act-fn", "topk", "batchtopk", "--lr", "1e-3"])
    assert len(cfgs) == 8 and {(c.act_fn, c.top_k) for c in cfgs} == {
        (a, k) for a in ("topk", "batchtopk") for k in (16, 32, 64, 128)}
    assert all(c.lr == 1e-3 and c.batch_size == cfgs[0].batch_size for c in cfgs)
    assert train.sweep_names(cfgs)[:2] == ["topk-k16", "batchtopk-k16"]
    assert train.member_folders(cfgs)[0] == os.path.join(cfgs[0].exp_result_path, "topk-k16")
    # one value everywhere is a run of one SAE, written where it always was
    one, = train.parse_args(["--top-k", "32"])
    assert one == train.Config(top_k=32) and train.member_folders([one]) == [one.exp_result_path]
    assert train.sweep_names([one]) == [""]
    # a switch is swept with true / false; alone it stays a plain flag
    tc = ["--hook-point-in", "blocks.0.ln2.hook_normalized", "--hook-point-out", "blocks.0.hook_mlp_out"]
    cfgs = train.parse_args(tc + ["--skip-connection", "false", "True", "--top-k", "16", "32"])
    assert [(c.skip_connection, c.top_k) for c in cfgs] == [(False, 16), (False, 32), (True, 16), (True, 32)]
    assert train.sweep_names(cfgs) == ["k16-noskip", "k32-noskip", "k16-skip", "k32-skip"]
    assert [c.skip_connection for c in train.parse_args(tc + ["--skip-connection"])] == [True]
    with pytest.raises(ValueError, match="--skip-connection yes: give true or false"):
        train.parse_args(tc + ["--skip-connection", "yes"])


def test_a_config_file_lists_the_saes_of_a_sweep(tmp_path):
    (tmp_path / "sweep.toml").write_text('batch_size = 512\n[[saes]]\nact_fn = "topk"\ntop_k = 16\n'
                                         '[[saes]]\nact_fn = "relu"\nsparsity_coefficient = 1.5\n')
    a, b = train.parse_args(["--config", str(tmp_path / "sweep.toml"), "--lr", "2e-4"])
    assert (a.act_fn, a.top_k, b.act_fn, b.sparsity_coefficient) == ("topk", 16, "relu", 1.5)
    assert a.batch_size == b.batch_size == 512 and a.lr == b.lr == 2e-4
    (tmp_path / "bad.toml").write_text('[[saes]]\ntop_k = 16\nbatch_size = 256\n')
    with pytest.raises(ValueError, match=r"unknown key saes\[0\].'batch_size' .*shared: set it above"):
        train.parse_args(["--config", str(tmp_path / "bad.toml")])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "256", "512"], "--batch-size takes one value: the SAEs of a sweep share it"),
    (["--top-k", "16", "16"], "the sweep has the SAE of these settings twice"),
    (["--top-k", "16", "32", "--act-fn", "topk", "topk"], "the sweep has the SAE k16 twice"),
    (["--act-fn", "topk", "relu", "--sparsity-coefficient", "1"], "--sparsity-coefficient does nothing with --act-fn topk"),
    (["--hook-point-in", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"], "blocks.2.hook_resid_post"),
    (["--hook-point-in", *HOOKS, "--max-norm-ratio", "10"], "sweep one --hook-point-in per run with it"),
    (["--expansion-factor", "8", "10000000"], r"this run needs about .* GiB besides the LM \(2 SAE\(s\)"),
])
def test_a_bad_sweep_is_one_line_before_the_model_loads(tiny_model_path, tmp_path, argv, message, monkeypatch,
                                                        capsys):
    monkeypatch.setattr(train, "load_lm", lambda *a: pytest.fail("the LM loaded"))
    with pytest.raises((ValueError, SystemExit)) as e:      # (tyro prints a Config's own check, then exits 2)
        train.main(train.parse_args(args_for(tiny_model_path, tmp_path / "run", *argv)))
    assert re.search(message, " ".join(re.sub("[│╭╮╰╯─]", " ", f"{e.value} {capsys.readouterr().err}").split()))
    assert not os.path.exists(tmp_path / "run")


def test_each_sae_of_a_sweep_is_the_one_trained_alone_and_the_sweep_is_summarised(tiny_model_path, tmp_path):
    out = tmp_path / "sweep"
    res = train.main(train.parse_args(args_for(tiny_model_path, out, "--hook-point-in", *HOOKS,
                                               "--act-fn", "topk", "batchtopk", steps=30)))
    names = ["topk-blocks.0.hook_resid_post", "batchtopk-blocks.0.hook_resid_post",
             "topk-blocks.1.hook_resid_post", "batchtopk-blocks.1.hook_resid_post"]
    assert sorted(res) == sorted(names)
    for name in names:
        folder = out / name
        assert SAE.load(str(folder)).d_sae == 256 and (folder / "eval.json").exists()
        assert len(open(folder / "log.jsonl").readlines()) == 3
        assert (folder / "jumprelu" / "sae.safetensors").exists() == name.startswith("batchtopk")
    # the same SAE trained by itself, from the settings its folder recorded: bitwise the same
    alone = tmp_path / "alone"
    cfg, = train.parse_args(["--config", str(out / names[3] / "train_config.json"), "--exp-result-path", str(alone)])
    assert (cfg.hook_point_in, cfg.act_fn) == (HOOKS[1], "batchtopk")
    single = train.main(cfg)
    assert max_diff(weights(alone), weights(out / names[3])) == 0.0
    assert max_diff(weights(alone / "jumprelu"), weights(out / names[3] / "jumprelu")) == 0.0
    assert single["explained_variance"] == pytest.approx(res[names[3]]["explained_variance"], abs=1e-6)
    assert single["ce_loss_recovered"] == pytest.approx(res[names[3]]["ce_loss_recovered"], abs=1e-6)
    # the summary: one row per SAE with its settings and metrics, and the frontier plot
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["name"] for r in rows] == names
    assert {(r["hook_point_in"], r["act_fn"]) for r in rows} == {(h, a) for h in HOOKS for a in ("topk", "batchtopk")}
    for r in rows:
        assert float(r["explained_variance"]) == pytest.approx(res[r["name"]]["explained_variance"])
        assert float(r["l0"]) == pytest.approx(res[r["name"]]["l0"]) and r["ce_loss_recovered"]
    assert json.load(open(out / "sweep.json"))["saes"][0]["name"] == names[0]
    png = open(out / "frontier.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_cache_of_several_hook_points_serves_a_sweep(tiny_model_path, tmp_path):
    cache = tmp_path / "cache"
    common = ["--total-training-tokens", str(256 * 20)]
    manifest = train.cache_main(train.parse_args(args_for(tiny_model_path, tmp_path / "x", *common, "--hook-point-in",
                                                          *HOOKS, "--cache-activations", str(cache))))
    assert manifest["hooks"] == HOOKS and manifest["widths"] == [32, 32]
    shard = load_file(cache / manifest["shards"][0]["file"])
    assert shard["x"].shape == (manifest["shards"][0]["tokens"], 64)
    sweep = tmp_path / "sweep"
    train.main(train.parse_args(args_for(tiny_model_path, sweep, *common, "--activations", str(cache),
                                         "--hook-point-in", *HOOKS, "--top-k", "4", "8")))
    # the second hook's columns, alone: the same SAE as the sweep's
    alone = tmp_path / "alone"
    train.main(train.parse_args(args_for(tiny_model_path, alone, *common, "--activations", str(cache),
                                         "--hook-point-in", HOOKS[1], "--top-k", "4")))
    assert max_diff(weights(alone), weights(sweep / f"k4-{HOOKS[1]}")) == 0.0
    # a transcoder between the two cached hooks reads both columns
    res = train.main(train.parse_args(args_for(tiny_model_path, tmp_path / "tc", *common, "--activations", str(cache),
                                               "--hook-point-in", HOOKS[0], "--hook-point-out", HOOKS[1])))
    assert res["l0"] == 8


def test_a_sweep_killed_and_resumed_gives_the_uninterrupted_result(tiny_model_path, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # batchtopk with a tight clip: the clipping's running mean is state that the checkpoint must hold
    argv = ["--top-k", "4", "8", "--act-fn", "batchtopk", "--grad-clip-ratio", "1.01", "--checkpoint-every", "1"]
    run(args_for(tiny_model_path, ref, *argv, steps=40))
    at = kill_at_a_checkpoint(args_for(tiny_model_path, cut, *argv, steps=40), cut, 15)
    ckpt = torch.load(checkpoints(cut)[-1], weights_only=False)
    assert [c["top_k"] for c in ckpt["configs"]] == [4, 8] and len(ckpt["saes"]) == 2   # one file, both SAEs
    r = run(["--resume", str(cut)])
    assert f"resumed from step {at}" in r.stdout
    for name in ("k4", "k8"):
        assert max_diff(weights(ref / name), weights(cut / name)) == 0.0
    assert [r["name"] for r in csv.DictReader(open(cut / "sweep.csv"))] == ["k4", "k8"]


def test_torchrun_trains_a_sweep(tiny_model_path, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--act-fn", "topk", "batchtopk"]
    run(args_for(tiny_model_path, one, *argv))
    run(args_for(tiny_model_path, two, *argv), torchrun=True)       # the ranks assert they agree at the end
    for name in ("topk", "batchtopk"):
        a, b = (json.load(open(d / name / "eval.json")) for d in (one, two))
        assert abs(a["explained_variance"] - b["explained_variance"]) < 0.03, (a, b)
        assert a["l0"] == b["l0"] == 8
    shutil.rmtree(two / "checkpoints", ignore_errors=True)


def test_matryoshka_and_skip_transcoders_train_in_a_sweep(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "mat"
    monkeypatch.setenv("WANDB_MODE", "offline")
    res = train.main(train.parse_args(args_for(tiny_model_path, out, "--act-fn", "batchtopk",
                                               "--matryoshka-prefixes", "0", "3", "--wandb-project",
                                               "nanosae-test", steps=30)))
    (record,) = wandb_runs(out)         # one W&B run, each SAE's metrics under its name
    assert all(s in record[1] for s in (b"mat0/train/*", b"mat3/eval/*", b"mat3/train/l0"))
    mat = SAE.load(str(out / "mat3"))
    assert mat.matryoshka_sizes == [64, 128, 256] and SAE.load(str(out / "mat3" / "jumprelu")).act_fn == "jumprelu"
    assert res["mat3"]["l0"] == pytest.approx(8, abs=1e-6)
    # the logged reconstruction term of a Matryoshka SAE sums its 3 prefixes' errors
    last = {name: [json.loads(line) for line in open(out / name / "log.jsonl")][-1] for name in ("mat0", "mat3")}
    assert last["mat3"]["mse"] > 1.5 * last["mat0"]["mse"]
    # a skip transcoder from block 0's residual to block 1's (nearly linear: x plus one block's
    # update) reconstructs far better than the transcoder without one
    (tmp_path / "tc.toml").write_text('hook_point_in = "blocks.0.hook_resid_post"\n'
                                      'hook_point_out = "blocks.1.hook_resid_post"\n'
                                      '[[saes]]\nskip_connection = false\n[[saes]]\nskip_connection = true\n')
    out = tmp_path / "tc"
    argv = args_for(tiny_model_path, out, "--lr", "5e-3", steps=30)
    del argv[2:4]                                                      # (--hook-point-in: the file's)
    res = train.main(train.parse_args(["--config", str(tmp_path / "tc.toml"), *argv]))
    assert sorted(res) == ["noskip", "skip"]
    skip = SAE.load(str(out / "skip"))
    assert skip.skip_connection and skip.W_skip.abs().max() > 0.05
    assert res["skip"]["explained_variance"] > res["noskip"]["explained_variance"] + 0.03
    with pytest.raises(ValueError, match="--skip-connection is for a transcoder"):
        train.Config(skip_connection=True)
    with pytest.raises(ValueError, match="--matryoshka-prefixes does nothing with --act-fn relu"):
        train.Config(act_fn="relu", matryoshka_prefixes=3)
