"""Export to SAELens and to circuit-tracer, judged by each tool's own loader on SAEs and transcoders
trained briefly on real activations of the tiny model. Both pin transformer-lens < 4, so they run in
an environment of their own, built once (a few minutes) under ~/.cache/nanosae/interop-venv
(NANOSAE_INTEROP_VENV elsewhere) and reused; it sees this environment's torch rather than
downloading another."""
import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae import SAE, export_circuit_tracer, export_saelens

TOOLS = ["sae-lens==6.54.12", "circuit-tracer==0.5.0"]
VENV = os.environ.get("NANOSAE_INTEROP_VENV", os.path.expanduser("~/.cache/nanosae/interop-venv"))
HERE = os.path.dirname(os.path.abspath(__file__))
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "No matching distribution found", "Could not find a version")


def link_torch(python: str):
    """Make the venv see this environment's torch: links to its packages and its dist-info (so pip
    counts torch as installed) in a folder that a .pth file puts on the venv's path."""
    dist = importlib.metadata.distribution("torch")
    site, tops = str(dist.locate_file("")), {str(f).split("/")[0] for f in dist.files} - {".."}
    folder = os.path.join(VENV, "nanosae-torch")
    links = {os.path.join(folder, top): os.path.join(site, top) for top in tops}
    if os.path.isdir(folder) and sorted(os.listdir(folder)) == sorted(tops) and \
            all(os.readlink(link) == target for link, target in links.items()):
        return                                           # (a test process beside this one may use them)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for link, target in links.items():
        os.symlink(target, link)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "nanosae_torch.pth"), "w") as f:
        f.write(folder + "\n")


@pytest.fixture(scope="session")
def interop_python():
    """The python of the environment of SAELens and circuit-tracer, built if absent (or if it was
    made for another torch, python or tool version)."""
    python, stamp = os.path.join(VENV, "bin", "python"), os.path.join(VENV, "nanosae-built")
    want = " ".join(TOOLS + [f"torch=={torch.__version__}", f"python=={sys.version.split()[0]}"])
    os.makedirs(os.path.dirname(VENV), exist_ok=True)
    with open(VENV + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # another test process may be building it
        if os.path.exists(stamp) and open(stamp).read() == want:
            link_torch(python)                          # this checkout's torch: a clone elsewhere has its own
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        link_torch(python)
        r = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *TOOLS],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode:
            shutil.rmtree(VENV, ignore_errors=True)
            tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            if any(s in r.stderr for s in OFFLINE):
                pytest.skip(f"cannot install {' '.join(TOOLS)} (is PyPI reachable?): {tail}")
            pytest.fail(f"pip install {' '.join(TOOLS)} failed: {r.stderr[-3000:]}")
        with open(stamp, "w") as f:
            f.write(want)
        return python


HOOK, MLP_IN, MLP_OUT = "blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def activations(tiny_model):
    """Real activations of the tiny model at three hook points, BOS left out: (tokens, 32) each."""
    torch.manual_seed(0)
    tokens = torch.randint(1000, len(tiny_model.tokenizer), (32, 64))
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[HOOK, MLP_IN, MLP_OUT])
    return {h: cache[h][:, 1:].reshape(-1, cache[h].shape[-1]).float().contiguous() for h in (HOOK, MLP_IN, MLP_OUT)}


def trained(x, y, act_fn, transcoder=False, **kw) -> SAE:
    """A small SAE (or transcoder) trained for a few steps as train.py trains one (normalized
    activations, the loss terms of its act_fn), then folded to take raw activations, as saved."""
    torch.manual_seed(0)
    s_in, s_out = (32 ** 0.5 / t.norm(dim=1).mean().item() for t in (x, y))
    sae = SAE(32, 128, act_fn, 8, d_out=32, transcoder=transcoder, jumprelu_init_threshold=0.3, **kw)
    opt = torch.optim.Adam(sae.param_groups(0.1), lr=3e-3)
    with torch.no_grad():
        sae.b_dec.copy_(y.mean(0) * s_out)
    for step in range(40):
        i = torch.randint(0, len(x) - 1000, (256,))
        for group in opt.param_groups:
            group["lr"] = 3e-3 * group.get("lr_factor", 1.0)
        y_hat, code = sae(x[i] * s_in)
        loss = sae.reconstruction_loss(code, y[i] * s_out, y_hat)
        if act_fn in ("relu", "jumprelu"):
            loss = loss + 0.01 * sae.sparsity_loss(code, "l1" if act_fn == "relu" else "tanh")
        opt.zero_grad()
        loss.backward()
        opt.step()
    sae.fold_scales_(s_in, s_out)
    return sae.eval()


# name: (act_fn, transcoder, extra kwargs, the SAELens architecture it must load as)
CASES = {"relu": ("relu", False, {}, "standard"),
         "jumprelu": ("jumprelu", False, {}, "jumprelu"),
         "topk": ("topk", False, {}, "topk"),
         "batchtopk": ("batchtopk", False, {"matryoshka_sizes": [16, 32, 64]}, "jumprelu"),
         "relu-skip-transcoder": ("relu", True, {"skip_connection": True}, "skip_transcoder"),
         "batchtopk-transcoder": ("batchtopk", True, {}, "jumprelu_transcoder"),
         "jumprelu-skip-transcoder": ("jumprelu", True, {"skip_connection": True}, "jumprelu_skip_transcoder")}


def test_the_tools_load_the_exports_and_compute_our_code_and_reconstruction(activations, interop_python, tmp_path):
    """For each act_fn (batchtopk as its JumpReLU conversion) and transcoder kind: SAELens's
    SAE.load_from_disk reads the exported folder as the expected architecture with the hook names,
    and circuit-tracer's load_relu_transcoder the exported transcoder file; on held-out activations
    the tool's latent activations equal our contributions f_i ||W_dec[i]|| and its output ours,
    within 1e-4 in fp32."""
    jobs, ours = [], []
    for name, (act_fn, transcoder, kw, _) in CASES.items():
        x, y = (activations[MLP_IN], activations[MLP_OUT]) if transcoder else (activations[HOOK],) * 2
        sae = trained(x, y, act_fn, transcoder, **kw)
        train = {"model": "tiny", "hook_point_in": MLP_IN if transcoder else HOOK,
                 "hook_point_out": MLP_OUT if transcoder else None, "context_size": 64}
        sae.save(tmp_path / name, {"train": train})
        loaded = SAE.load(tmp_path / name)
        if act_fn == "batchtopk":
            loaded.to_jumprelu_()
        x_test = x[-1000:]                                          # not trained on
        with torch.no_grad():
            y_hat, code = loaded(x_test)
        save_file({"x": x_test}, tmp_path / f"{name}-x.safetensors")
        exports = {"saelens": tmp_path / f"{name}-saelens"}
        export_saelens(str(tmp_path / name), str(exports["saelens"]))
        if transcoder:
            exports["circuit-tracer"] = tmp_path / f"{name}-circuit-tracer.safetensors"
            export_circuit_tracer(str(tmp_path / name), str(exports["circuit-tracer"]))
        for tool, path in exports.items():
            jobs.append({"tool": tool, "path": str(path), "x": str(tmp_path / f"{name}-x.safetensors"),
                         "out": str(tmp_path / f"{name}-{tool}-out.safetensors")})
            ours.append((name, y_hat, code.dense() * code.n_M, x_test))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    r = subprocess.run([interop_python, os.path.join(HERE, "interop_run.py"), str(tmp_path / "jobs.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for job, (name, y_ours, a_ours, x_test) in zip(jobs, ours):
        act_fn, transcoder, kw, arch = CASES[name]
        with safe_open(job["out"], "pt") as f:
            meta, acts, y_hat = f.metadata(), f.get_tensor("acts"), f.get_tensor("y_hat")
        if job["tool"] == "saelens":
            assert meta["architecture"] == arch, name
            assert meta["hook_name"] == (MLP_IN if transcoder else HOOK)
            assert meta["hook_name_out"] == (MLP_OUT if transcoder else "None")
        else:
            assert meta["activation"] == ("function" if act_fn == "relu" else "JumpReLU"), name
            assert meta["skip"] == str(kw.get("skip_connection", False)), name
        l0 = (a_ours > 0).float().sum(-1).mean()
        assert 1 <= l0 <= 64, (name, l0)                            # a code worth comparing
        # within 1e-4, and within 1e-4 of the largest value (the tiny model's activations are small)
        assert (acts - a_ours).abs().max() <= 1e-4 * min(1.0, a_ours.abs().max()), (name, job["tool"])
        assert (y_hat - y_ours).abs().max() <= 1e-4 * min(1.0, y_ours.abs().max()), (name, job["tool"])
        assert (y_ours - x_test).abs().max() > 1e-3                  # not a trivial identity


def test_export_refuses_what_the_tools_cannot_compute(tmp_path):
    """SAELens and circuit-tracer have no TopK transcoder, circuit-tracer no SAE and no transcoder
    from one width to another; a BatchTopK SAE that never trained has no threshold for its JumpReLU
    conversion: each is refused in one line instead of written wrong."""
    SAE(16, 64, "topk", 4, d_out=24, transcoder=True).save(tmp_path / "tc")
    with pytest.raises(ValueError, match="SAELens has no topk transcoder"):
        export_saelens(str(tmp_path / "tc"), str(tmp_path / "out"))
    for bad in (SAE(16, 64, "topk", 4, d_out=16, transcoder=True), SAE(16, 64, "relu", 4, d_out=24, transcoder=True),
                SAE(16, 64, "relu", 4)):
        bad.save(tmp_path / "bad")
        with pytest.raises(ValueError, match="circuit-tracer reads ReLU and JumpReLU transcoders with d_in = d_out"):
            export_circuit_tracer(str(tmp_path / "bad"), str(tmp_path / "out.safetensors"))
    SAE(16, 64, "batchtopk", 4).save(tmp_path / "b")
    with pytest.raises(ValueError, match="no running threshold"):
        export_saelens(str(tmp_path / "b"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.safetensors")
