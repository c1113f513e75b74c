"""Benchmarks of nanoSAE: one table per section, each figure the median of several repeats after
warmup, with the ratios that matter, and a summary of them at the end.

    python bench.py                             # every section (cuda if present, else cpu)
    python bench.py --quick                     # small shapes, few repeats: checks that it all runs
    python bench.py --markdown BENCHMARKS.md    # the same, also written as Markdown under a
                                                # description of the machine it ran on
    python bench.py --device cpu --sections matmul,sae --dtypes fp32,bf16

Speed depends on the machine more than on anything here, so every figure is only as good as the
description of the machine beside it: the CPU and whether it computes bf16 natively, the GPU, the
torch version, how busy the machine was. Each section times fp32, and bf16 where the device
computes it natively (a CUDA GPU with bf16, a CPU with AMX or AVX512_BF16: activations.native_bf16,
the rule train.py's auto dtypes follow). Elsewhere torch emulates bf16 at a fraction of fp32's
speed: no one should train that way, and timing it would take most of the bench's time
(--dtypes fp32,bf16 times it anyway).

1. matmul  GFLOP/s of the encoder's matmul, x (B, d) @ W_enc.T with W_enc (m, d) as sae.py stores
           it, at the SAE's shapes: the roofline of a step.
2. sae     tokens/s and achieved GFLOP/s of nanoSAE's own training step (sae.SAE forward, MSE, the
           sparsity penalty for relu/jumprelu, backward, fused Adam over sae.param_groups as
           train.py builds it: train.py's step without AuxK) per act_fn and dtype, next to a plain
           dense TopK step measured in the same run (x @ W_enc.T + b, topk of relu, dense
           f @ W_dec + b): the ratio nanoSAE/dense (the median over rounds of the steps taking
           turns), and each step's bf16/fp32. The bound on a step that runs the encoder's forward
           matmul in its dtype: that matmul alone, at the roofline, over the reference (fp32 topk
           and batchtopk on a CPU with AMX select on a bf16 estimate and recompute in fp32 only what
           the selection needs, so they can pass it). GFLOP/s counts the FLOPs of the step's dtype;
           "of roof" compares them with its roofline. relu and jumprelu are timed at L0 = k, as a
           trained SAE fires (sae.py's sparse path), and fresh, where about half the latents fire
           (its dense path); each also next to a plain dense step of its own act_fn and penalty
           (relu with l1; JumpReLU with sae.PlainJumpReLU's straight-through estimator and the
           tanh penalty), which costs the same at any L0.
3. lm      activation tokens/s of activations.iter_activations (TransformerBridge, stopping after
           blocks.15.hook_resid_post) on real Austen contexts, as many and as long per forward as
           train.py's defaults, next to a raw HF forward of the same 16 decoder layers: the ratio
           bridge/raw.
4. train   train.py as a user runs it, each time in a process of its own, at its defaults (its
           dtypes included) but for the length of the run and of its evaluation (--quick shrinks
           the batches too). End-to-end tokens/s (LM + mixing buffer + SAE step) read from the
           log.jsonl of a short run; the same run trained from an activation cache that a
           --cache-activations process wrote first (no LM while training); and a --eval-only
           process on the SAE the first run saved, timed whole: Python's start, the imports and
           the LM load are part of what a user waits for, and the smaller the evaluation, the
           larger their share. With section 3, how close the streaming run comes to what its two
           parts allow run one after the other, 1 / (1/LM + 1/cached): the LM forward of section
           3, the cached run for all the rest (measured minutes apart: on a busy machine the ratio
           can pass 100%).
5. analyze analyze.py as a user runs it, in a process of its own, on a fresh TopK SAE at --hook: the
           seconds of its LM forwards against those of its whole stream (LM, SAE encode, streaming
           top-k and samples) over the same tokens, both timed inside that process.
6. sweep   train.py sweeping eight SAEs (k = 16, 32, 64, 128 x topk, batchtopk, 8x) on one stream
           from the LM, against the same eight trained by eight single runs of the same tokens, each
           a process of its own, timed whole (start, LM load, training, evaluation), and their
           training alone, as section 4 reads it from log.jsonl: the sweep runs the LM once, the SAE
           steps eight times; each SAE's evaluation splices it into its own LM forward. --quick: two
           SAEs (k = 16, 32, topk).
7. quality nanoSAE's topk and batchtopk at train.py's defaults against PlainTopK, the textbook TopK
           SAE, on identical activations: 400k tokens of --hook cached once from five of the six
           bundled novels, two passes in the same batch order, SAEs in fp32; held-out explained
           variance (all tokens, and typical ones), L0, dead latents and CE loss recovered on the
           sixth novel, which no run saw. The comparison the defaults are chosen by (README).
"""
import argparse
import datetime
import glob
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import activations as acts
from sae import SAE, TANH_C, Code, PlainJumpReLU, keep_freed_memory

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK = "blocks.15.hook_resid_post"
CONTEXT = 128               # tokens per context, as train.py's default: section 3 times the LM as it runs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ACT_FNS = ("relu", "jumprelu", "topk", "batchtopk")
FRESH = ("relu fresh", "jumprelu fresh")        # at a fresh SAE's L0 (~m/2): sae.py's dense path
REFS = ("dense topk (ref)", "plain relu", "plain jumprelu")     # dense_step's


# --- the machine, and the report -----------------------------------------------------------------


def cpu_info() -> tuple[str, list[str] | None]:
    """The CPU's model name and the bf16 instructions /proc/cpuinfo lists for it (amx_bf16 and
    avx512_bf16 on x86, bf16 on Arm); None for those where there is no /proc/cpuinfo to ask."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), None
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or info.get("Model") or platform.processor() or platform.machine()
    flags = (info.get("flags") or info.get("Features") or "").split()
    return name, [f for f in flags if f in ("amx_bf16", "avx512_bf16", "bf16")]


def code_version() -> str:
    """A hash of the code the figures measure, and where it is in git: the commit, and whether the
    tracked files differ from it (then the hash tells two versions apart)."""
    digest = hashlib.sha256()
    for name in ("activations.py", "sae.py", "train.py", "bench.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    files = f"sha256 {digest.hexdigest()[:12]} of activations.py, sae.py, train.py, bench.py"
    git = ["git", "-C", HERE, "-c", "safe.directory=*"]
    try:
        commit, dirty = (subprocess.run(git + args, capture_output=True, text=True, check=True, timeout=10).stdout
                         for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "-uno"]))
    except (OSError, subprocess.SubprocessError):             # no git, or not a repository
        return files
    return f"git {commit.strip()}" + (" with uncommitted changes" if dirty.strip() else "") + f"; {files}"


def machine(a) -> list[str]:
    """What the figures depend on, one line each: the header of the console output and of the
    Markdown file."""
    cpu, bf16 = cpu_info()
    native = ("unknown (no /proc/cpuinfo)" if bf16 is None else "yes, " + ", ".join(bf16) if bf16 else
              "no (/proc/cpuinfo lists none of amx_bf16, avx512_bf16, bf16)")
    lines = [f"CPU: {cpu}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads",
             f"CPU native bf16: {native}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    if torch.cuda.is_available():
        used = a.device.startswith("cuda")
        lines.append(f"GPU: {torch.cuda.get_device_name(a.device if used else 0)}, CUDA {torch.version.cuda}, "
                     f"native bf16 {'yes' if acts.native_bf16('cuda') else 'no'}" + ("" if used else ", not used"))
    else:
        lines.append("GPU: none")
    lines += [f"device {a.device}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
              f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
              f"command: {shlex.join(['python', *sys.argv])}",
              f"LM of sections 3-7: {a.model}, at {a.hook}",
              f"code: {code_version()}",
              # other processes on the machine skew every figure: the load average says how busy it was
              f"load average at the start: {os.getloadavg()[0]:.1f}",
              "dtypes timed: " + ", ".join(a.dtypes) + ("" if a.native_bf16 else
                                                        " (bf16 is not native here: --dtypes fp32,bf16 times it)")]
    return lines + (["quick: small shapes and few repeats, a check that everything runs, not a measurement"]
                    if a.quick else [])


class Report:
    """Prints the bench's output and keeps the same as Markdown, for --markdown."""

    def __init__(self):
        self.md: list[str] = []

    def section(self, title: str):
        print(f"== {title} ==")
        self.md.append(f"## {title}")

    def say(self, text: str):
        print(text)
        self.md.append(text)

    def table(self, header: list[str], rows: list[list]):
        cells = [header] + [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        for i, r in enumerate(cells):
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print()
        self.md.append("\n".join(["| " + " | ".join(r) + " |" for r in cells[:1]] +
                                 ["|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"] +
                                 ["| " + " | ".join(r) + " |" for r in cells[1:]]))

    def summary(self, lines: list[str]):
        print("== summary ==\n" + "\n".join(lines))
        self.md += ["## Summary", "\n".join(f"- {line}" for line in lines)]

    def write(self, path: str, header: list[str]):
        """The file anew, but for its section "## Ablations" (to its end): single experiments
        recorded by hand, each with the machine it ran on, which no bench section repeats."""
        kept = ""
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
            kept = old[old.find("\n## Ablations"):] if "\n## Ablations" in old else ""
        text = "\n\n".join(["# nanoSAE benchmarks", "\n".join(f"- {line}" for line in header)] + self.md)
        with open(path, "w") as f:
            f.write(text + "\n" + kept)


def timeit(fns: list, device: str, warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of each fn() in each of `repeats` rounds, after `warmup` untimed ones (CUDA kernels
    are asynchronous: synchronize before reading the clock). The fns take turns call by call: a
    ratio of two slow steps timed one after the other drifts with whatever else the machine does
    meanwhile, one of steps that alternate does not."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, times):
            sync()
            t = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t)
    return times


# --- 1. matmul roofline --------------------------------------------------------------------------


def bench_matmul(a, out: Report) -> dict:
    roof, rows = {}, []
    for m in (e * a.d for e in a.expansions):
        for name in a.dtypes:
            x, W = (torch.randn(*shape, dtype=DTYPES[name], device=a.device) for shape in ((a.batch, a.d), (m, a.d)))
            t = statistics.median(timeit([lambda: x @ W.T], a.device, *a.reps)[0])
            roof[m, name] = 2 * a.batch * a.d * m / t / 1e9
        rows.append([f"({a.batch}, {a.d}) @ ({m}, {a.d}).T"] + [roof[m, name] for name in a.dtypes] +
                    ([f"{roof[m, 'bf16'] / roof[m, 'fp32']:.2f}x"] if len(a.dtypes) == 2 else []))
    out.table(["shape"] + [f"{name} GFLOP/s" for name in a.dtypes] + ["bf16/fp32"] * (len(a.dtypes) == 2), rows)
    return roof


# --- 2. SAE training step: nanoSAE per act_fn vs a dense TopK reference --------------------------


def adam_step(params: list, loss_fn, autocast, opt):
    """One training step: loss_fn() under autocast, backward, opt.step()."""
    def step():
        with autocast:
            loss = loss_fn()
        for p in params:
            p.grad = None
        loss.backward()
        opt.step()
    return step


def sae_step(a, act_fn: str, m: int, x, autocast):
    """nanoSAE's step, as train.py takes it (AuxK aside: a fresh SAE has no dead latents), and a
    function that gives the batch's L0 and whether sae.py took its sparse path. "relu" and
    "jumprelu" are timed at L0 = k, "relu fresh" and "jumprelu fresh" at a fresh SAE's L0."""
    act_fn, fresh = act_fn.split()[0], act_fn.endswith("fresh")
    sae = SAE(a.d, m, act_fn, a.k, device=a.device)
    penalty = {"relu": "l1", "jumprelu": "tanh"}.get(act_fn)       # train.py's default penalties
    if penalty and not fresh:
        # A fresh relu / jumprelu SAE fires on about half of its latents; a trained one on ~k per
        # token, where sae.py takes its sparse path. Time that regime, as most of a run is: shift
        # b_enc (relu) or set the thresholds (jumprelu) so that every latent fires on k/m of the
        # tokens, L0 = k. The contributions c = h * ||W_dec[i]||, from the weights.
        with torch.no_grad():
            n_M = sae.W_dec.norm(dim=1)
            c_BM = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * n_M
            c_q = c_BM.kthvalue(len(x) - len(x) * a.k // m, dim=0).values
            if act_fn == "relu":
                sae.b_enc -= c_q / n_M
            else:
                sae.log_threshold.copy_(c_q.clamp(min=1e-3).log())
    opt = torch.optim.Adam(sae.param_groups(1.0), lr=1e-4, betas=(0.9, 0.999), fused=True)   # train.py's

    def loss_fn():
        y_hat, code = sae(x)
        mse = (y_hat.float() - x).pow(2).sum(-1).mean()
        return mse + 5e-3 * sae.sparsity_loss(code, penalty) if penalty else mse

    @torch.no_grad()
    def l0_and_path():                          # after the timing: not part of the step
        with autocast:
            code = sae(x)[1]
        return code.nnz_per_token().mean().item(), code.f_BM is None
    return adam_step(list(sae.parameters()), loss_fn, autocast, opt), l0_and_path


def dense_step(a, act_fn: str, m: int, x, autocast):
    """A plain dense SAE step, written the straightforward way (a dense (B, m) code decoded with a
    dense matmul, plain autograd, torch's default Adam). "topk": PlainTopK, the textbook TopK SAE, the
    reference of every row (the code scattered into a zero (B, m) matrix, m*d per token where
    nanoSAE's sparse decode, an embedding_bag, costs k*d). "relu" and "jumprelu": the same
    act_fn and penalty as nanoSAE's step (l1 on f * n; JumpReLU of the contributions c = h * n
    with sae.PlainJumpReLU's straight-through estimator, and tanh), its like-for-like reference."""
    if act_fn == "topk":
        ref = PlainTopK(a.d, m, a.k, device=a.device)
        params = list(ref.parameters())
        return adam_step(params, lambda: ref.loss(x), autocast, torch.optim.Adam(params, lr=1e-4))
    W_enc = (torch.randn(m, a.d, device=a.device) / a.d ** 0.5).requires_grad_()     # (m, d)
    W_dec = W_enc.detach().clone().requires_grad_()                                 # (m, d)
    b_enc, b_dec = (torch.zeros(n, device=a.device, requires_grad=True) for n in (m, a.d))
    log_theta = torch.full((m,), math.log(0.1), device=a.device, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec] + [log_theta] * (act_fn == "jumprelu")

    def loss_fn():
        h_BM = x @ W_enc.T + b_enc
        if act_fn == "relu":
            f_BM = F.relu(h_BM)
            a_BM = f_BM * W_dec.norm(dim=1)                            # the contributions
        else:
            n_M = W_dec.norm(dim=1)
            a_BM = PlainJumpReLU.apply(h_BM * n_M, log_theta.exp(), 0.1)
            f_BM = a_BM / n_M
        loss = (f_BM @ W_dec + b_dec - x).float().pow(2).sum(-1).mean()
        loss = loss + 5e-3 * (a_BM if act_fn == "relu" else torch.tanh(TANH_C * a_BM)).sum(-1).mean()
        return loss
    return adam_step(params, loss_fn, autocast, torch.optim.Adam(params, lr=1e-4))


def step_flops(B: int, d: int, m: int, l0: float | None) -> float:
    """Matmul FLOPs of one step as sae.py implements it. Encoder forward: 2Bdm. The dense path
    (l0 None: the reference, and relu / jumprelu while many latents fire): dW_enc 2Bdm (x needs
    no gradient) and a dense decode, forward + dW_dec + df = 3 x 2Bmd. The sparse path (topk,
    batchtopk, and relu / jumprelu at a low L0): only the active latents get a gradient (dW_enc
    is a scatter of x rows, 2B l0 d) and the decode is sparse (3 x 2B l0 d)."""
    return 2 * B * d * m + 8 * B * d * (m if l0 is None else l0)


def paired(ref_ts: list[float], ts: list[float]) -> float:
    """The median over the rounds of the reference's time over the step's, both of that round."""
    return statistics.median(r / s for r, s in zip(ref_ts, ts))


def bench_sae(a, roof: dict, out: Report) -> tuple[dict, dict, dict]:
    """The table; returns {(step, expansion, dtype): nanoSAE/dense topk}, {...: tokens/s} and, for
    relu and jumprelu, {...: nanoSAE/plain dense step of the same act_fn}."""
    ratios, rates, like, rows = {}, {}, {}, []
    x = torch.randn(a.batch, a.d, device=a.device)
    for e in a.expansions:
        m = e * a.d
        for name in a.dtypes:
            autocast = torch.autocast(torch.device(a.device).type, dtype=DTYPES[name], enabled=name != "fp32")
            steps, l0_and_path = [], []
            for ref in REFS:
                torch.manual_seed(0)
                steps.append(dense_step(a, ref.split()[1], m, x, autocast))
                l0_and_path.append(lambda: (None, False))
            for act_fn in ACT_FNS + FRESH:
                torch.manual_seed(0)
                step, l0_path = sae_step(a, act_fn, m, x, autocast)
                steps.append(step)
                l0_and_path.append(l0_path)
            # All of them take turns, the dense references included.
            rounds = dict(zip(REFS + ACT_FNS + FRESH, timeit(steps, a.device, *a.sae_reps[e])))
            # The ratio of each round's pair (reference, step), its median over the rounds: a pair is
            # timed seconds apart, so a slow stretch of the machine slows both.
            for (step, ts), l0_path in zip(rounds.items(), l0_and_path):
                l0, sparse = l0_path()
                t = statistics.median(ts)
                rates[step, e, name] = a.batch / t
                ratios[step, e, name] = paired(rounds[REFS[0]], ts)
                if (plain := f"plain {step.split()[0]}") in REFS and step not in REFS:
                    like[step, e, name] = paired(rounds[plain], ts)
                gflops = step_flops(a.batch, a.d, m, l0 if sparse else None) / t / 1e9
                rows.append([step, e, name, "-" if l0 is None else f"{l0:.0f}", f"{rates[step, e, name]:,.0f}",
                             gflops, f"{gflops / roof[m, name]:.0%}", f"{ratios[step, e, name]:.2f}x",
                             f"{like[step, e, name]:.2f}x" if (step, e, name) in like else ""])
            del steps, l0_and_path, rounds                       # free the weights and Adam states
    out.table(["step", "expansion", "dtype", "L0", "tokens/s", "GFLOP/s", "of roof", "vs dense topk",
               "vs plain same act_fn"], rows)
    return ratios, rates, like


# --- 3. activation generation: TransformerBridge vs raw HF, same contexts, same layers -----------


def bench_lm(a, out: Report) -> tuple[dict, dict]:
    """The table; returns {dtype: bridge/raw} and {dtype: the bridge's tokens/s}."""
    n, ratios, rates, rows = a.lm_contexts, {}, {}, []
    for name in a.dtypes:
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[name]
        bridge = acts.load_model(a.model, dtype, a.device)
        contexts = acts.iter_contexts(lambda: acts.iter_texts(acts.EMBEDDED_DATASET), bridge.tokenizer, CONTEXT)
        batch = [next(contexts) for _ in range(n)]      # tokenized once: both time the forward only
        drop = acts.special_token_ids(bridge.tokenizer)
        raw = transformers.AutoModelForCausalLM.from_pretrained(acts.model_path(a.model),
                                                                dtype=acts.DTYPES[dtype]).to(a.device).eval()
        raw.model.layers = raw.model.layers[:acts.hook_layer(a.hook) + 1]    # as stop_at_layer
        tokens_BT = torch.stack([c for _, c in batch]).to(a.device)

        def bridge_fwd():
            return list(acts.iter_activations(bridge, iter(batch), [a.hook], drop, n, a.device))
        with torch.no_grad():
            rounds = timeit([bridge_fwd, lambda: raw.model(tokens_BT)], a.device, *a.lm_reps)
        t_bridge, t_raw = map(statistics.median, rounds)
        # Both rates count every position of the contexts (the bridge's output drops BOS, 1 in 128).
        rates[name] = n * CONTEXT / t_bridge
        ratios[name] = statistics.median(r / b for b, r in zip(*rounds))     # per round, as in section 2
        rows.append([name, f"{rates[name]:,.0f}", f"{n * CONTEXT / t_raw:,.0f}", f"{ratios[name]:.2f}x"])
        attn = (bridge.original_model.config._attn_implementation, raw.config._attn_implementation)
        bridge = raw = None                             # free both models before the next dtype
    out.say(f"{n} contexts of {CONTEXT} tokens per forward, up to {a.hook}; attention: bridge {attn[0]}, raw {attn[1]}")
    out.table(["dtype", "bridge tokens/s", "raw HF tokens/s", "bridge/raw"], rows)
    return ratios, rates


# --- 4. end-to-end train.py, each run a process of its own ---------------------------------------


def train_py(args: list[str]) -> float:
    """Run `python train.py ARGS` from this folder, as a user would; its wall seconds. Its output
    is kept for an error's message only."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "train.py", *args], cwd=HERE, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"train.py {shlex.join(args)} exited with {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
    return time.perf_counter() - t


def logged_tokens_per_s(folder: str) -> float:
    """Training tokens/s of a run, from its log.jsonl. The first window is unlike the others (it
    starts with the mixing buffer full, and makes the first call of every kernel): skip it, and
    pool the rest as tokens over time (a line covers the tokens since the line before, at its
    tokens_per_s)."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) >= 2, f"{folder}: {len(lines)} log line(s); the bench needs 2 or more"
    n = [b["tokens"] - a["tokens"] for a, b in zip(lines, lines[1:])]
    return sum(n) / sum(k / m["tokens_per_s"] for k, m in zip(n, lines[1:]))


def bench_train(a, out: Report) -> tuple[dict, str]:
    """The table; returns {"streaming", "cache", "cached", "evaluation": tokens/s} and the LM's
    dtype, as train.py chose it."""
    steps, log_every = a.train_steps
    run = {**a.train, "total-training-tokens": steps * a.train["batch-size"], "log-frequency": log_every,
           "eval-tokens": a.eval_tokens, "device": a.device, "model": a.model, "hook-point-in": a.hook}
    flags = [s for k, v in run.items() for s in (f"--{k}", str(v))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        streaming, cache, cached = (os.path.join(tmp, name) for name in ("streaming", "cache", "cached"))
        wall = {"streaming": train_py(flags + ["--exp-result-path", streaming])}
        # The activation cache: the LM runs once, in a process that writes the shards; the run
        # from them trains with no LM, and loads it only for its evaluation at the end.
        wall["cache"] = train_py(flags + ["--cache-activations", cache])
        wall["cached"] = train_py(flags + ["--activations", cache, "--exp-result-path", cached])
        # The held-out evaluation that ends every run, of the SAE the streaming run saved, in its
        # own process on the settings that run saved.
        wall["evaluation"] = train_py(["--eval-only", streaming, "--device", a.device])
        with open(os.path.join(streaming, "train_config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(streaming, "eval.json")) as f:
            n_eval = json.load(f)["tokens"]
        with open(os.path.join(cache, "manifest.json")) as f:
            n_cache = json.load(f)["tokens"]
        rates = {"streaming": logged_tokens_per_s(streaming), "cache": n_cache / wall["cache"],
                 "cached": logged_tokens_per_s(cached), "evaluation": n_eval / wall["evaluation"]}
    out.say(f"{cfg['act_fn']}, expansion {cfg['expansion_factor']}, batch {cfg['batch_size']}, "
            f"LM {cfg['model_dtype']}, SAE {cfg['dtype']} (autocast {cfg['amp_dtype']}), {steps} steps per run, "
            f"evaluation of {cfg['eval_tokens']:,} tokens: {time.perf_counter() - t0:.0f} s wall in all")
    out.say(f"training: tokens/s of log lines 2..{steps // log_every} of log.jsonl; writing the cache and "
            f"the evaluation: tokens over the process's wall time (Python start, imports, LM load included)")
    names = {"streaming": "streaming run, training (LM + buffer + SAE)",
             "cache": "--cache-activations (LM, writing shards)",
             "cached": "cached run, training (shards + buffer + SAE)",
             "evaluation": "--eval-only, held-out evaluation"}
    out.table(["process", "tokens/s", "process wall s"],
              [[names[k], f"{rates[k]:,.0f}", f"{wall[k]:.0f}"] for k in names])
    return rates, cfg["model_dtype"]


# --- 5. analyze.py: the LM forward and the SAE's latent statistics, in one process ----------------


def bench_analyze(a, out: Report) -> float:
    """`python analyze.py` on a fresh TopK SAE (k = 64, 8x) at --hook, over the first contexts of the
    bundled text, in a process of its own. The process times its own LM forwards and its whole
    stream (LM, SAE encode, streaming top-k and samples), so the ratio of the two is what the
    analysis adds to the LM forward of the same tokens. Returns that ratio."""
    n, batch = (4, 2) if a.quick else (64, 16) if a.device == "cpu" else (256, 64)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        run = {"model": a.model, "hook_point_in": a.hook, "context_size": CONTEXT,
               "dataset": acts.EMBEDDED_DATASET, "eval_tokens": n * CONTEXT, "model_dtype": "float32"}
        SAE(a.d_model, 8 * a.d_model, "topk", min(64, a.d_model)).save(tmp, {"train": run})
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "analyze.py", tmp, "--batch-contexts", str(batch), "--device", a.device],
                           cwd=HERE, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            raise RuntimeError(f"analyze.py exited with {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
        with open(os.path.join(tmp, "features", "summary.js")) as f:
            text = f.read()
        meta = json.loads(text[text.index(",") + 1:text.rindex(")")])["meta"]
    tokens = meta["contexts"] * CONTEXT
    out.say(f"{tokens:,} tokens ({n} contexts of {CONTEXT}, {batch} per forward) up to {a.hook}, fp32; SAE topk "
            f"k={min(64, a.d_model)}, {8 * a.d_model:,} latents; top 20 and 10 samples per latent; process wall {wall:.0f} s")
    out.table(["part", "tokens/s", "s"],
              [[name, f"{tokens / meta[k]:,.0f}", f"{meta[k]:.1f}"] for name, k in
               (("LM forward alone", "lm_seconds"), ("analysis (LM + SAE + top-k + samples)", "seconds"))])
    return meta["seconds"] / meta["lm_seconds"]


# --- 6. a sweep against single runs ---------------------------------------------------------------


def bench_sweep(a, out: Report) -> tuple[float, float]:
    """The eight SAEs of one sweep process against eight single-run processes; returns the
    sweep's time over the single runs' total: wall time of the processes (start, LM load and
    evaluation included), and training time (log lines 2.. of log.jsonl, as section 4)."""
    steps, log_every = a.train_steps
    ks, act_fns = ((16, 32), ("topk",)) if a.quick else ((16, 32, 64, 128), ("topk", "batchtopk"))
    run = {**a.train, "total-training-tokens": steps * a.train["batch-size"], "log-frequency": log_every,
           "eval-tokens": a.eval_tokens, "device": a.device, "model": a.model, "hook-point-in": a.hook}
    flags = [s for k, v in run.items() for s in (f"--{k}", str(v))]
    with tempfile.TemporaryDirectory() as tmp:
        sweep = train_py(flags + ["--top-k", *map(str, ks), "--act-fn", *act_fns, "--exp-result-path",
                                  os.path.join(tmp, "sweep")])
        folders = [os.path.join(tmp, f"{f}{k}") for k in ks for f in act_fns]     # the single runs'
        single = [train_py(flags + ["--top-k", str(k), "--act-fn", f, "--exp-result-path", folder])
                  for (k, f), folder in zip(itertools.product(ks, act_fns), folders)]
        # every SAE of a sweep logs the same windows' wall time: one of them gives the sweep's
        trained = (steps - log_every) * a.train["batch-size"]
        member = os.path.dirname(glob.glob(os.path.join(tmp, "sweep", "*", "log.jsonl"))[0])
        train_sweep = trained / logged_tokens_per_s(member)
        train_single = [trained / logged_tokens_per_s(folder) for folder in folders]
    n = len(single)
    out.say(f"{n} SAEs (k {', '.join(map(str, ks))} x {', '.join(act_fns)}, expansion 8), {steps} steps of "
            f"{a.train['batch-size']} tokens each, evaluation of {a.eval_tokens:,} tokens; process wall "
            f"times, and training times of steps {log_every + 1}..{steps} (log.jsonl)")
    out.table(["processes", "wall s", "per SAE s", "training s", "training per SAE s"],
              [[f"one sweep of {n}", f"{sweep:.0f}", f"{sweep / n:.1f}", f"{train_sweep:.1f}", f"{train_sweep / n:.2f}"],
               [f"{n} single runs", f"{sum(single):.0f}", f"{sum(single) / n:.1f}", f"{sum(train_single):.1f}",
                f"{sum(train_single) / n:.2f}"]])
    return sweep / sum(single), train_sweep / sum(train_single)


# --- 7. quality: nanoSAE against a plain TopK SAE on identical activations ---------------------------


class PlainTopK(torch.nn.Module):
    """The textbook TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the
    baseline of section 7, and section 2's dense reference step. h = relu((x - b_dec) W_enc^T + b_enc),
    each token keeps its k largest h in a dense (B, m) code, x_hat = f W_dec + b_dec; decoder rows
    start at norm init_norm with W_enc = W_dec and are left free; the loss is the MSE alone (no AuxK).
    It trains on x * scale; forward() takes raw activations and returns (x_hat, sae.Code), as
    acts.evaluate calls an SAE."""

    def __init__(self, d: int, m: int, k: int, seed: int = 0, init_norm: float = 0.5, device="cpu"):
        super().__init__()
        W_MD = torch.randn(m, d, generator=torch.Generator(device).manual_seed(seed), device=device)
        W_MD *= init_norm / W_MD.norm(dim=1, keepdim=True)
        self.W_enc, self.W_dec = torch.nn.Parameter(W_MD.clone()), torch.nn.Parameter(W_MD)
        self.b_enc, self.b_dec = (torch.nn.Parameter(torch.zeros(n, device=device)) for n in (m, d))
        self.k, self.d_in, self.d_out, self.d_sae, self.scale = k, d, d, m, 1.0

    def code(self, x_BD: torch.Tensor) -> torch.Tensor:
        h_BM = F.relu((x_BD - self.b_dec) @ self.W_enc.T + self.b_enc)
        vals, idx = h_BM.topk(self.k, dim=-1)
        return torch.zeros_like(h_BM).scatter(-1, idx, vals)

    def loss(self, x_BD: torch.Tensor) -> torch.Tensor:
        return (self.code(x_BD) @ self.W_dec + self.b_dec - x_BD).float().pow(2).sum(-1).mean()

    def forward(self, x_BD: torch.Tensor):
        f_BM = self.code(x_BD * self.scale)
        x_hat = (f_BM @ self.W_dec + self.b_dec) / self.scale
        return x_hat, Code(f_BM, None, None, None, f_BM, self.W_dec.norm(dim=1), pre_is_c=False)


def train_plain_topk(cache: str, k: int, tokens: int, batch: int = 1024, buffer: int = 16_384,
                     perm_seed: int = 42, expansion: int = 8, lr: float = 1e-3, warmup: int = 50,
                     decay: float = 0.2, end_ratio: float = 1 / 32, seed: int = 0) -> PlainTopK:
    """PlainTopK trained on a cache that train.py --cache-activations wrote, on the batches a
    train.py run from it sees (its reader and mixing buffer, the same seeds), the textbook way: x
    scaled so that the first batch's mean ||x|| = sqrt(d), b_dec at that batch's mean, Adam at lr
    with `warmup` steps of linear warmup and a linear decay over the last `decay` of the run to
    lr * end_ratio."""
    with open(os.path.join(cache, "manifest.json")) as f:
        manifest = json.load(f)
    chunks = ((rows, None) for _, rows in acts.iter_cache(cache, manifest, perm_seed))
    batches = (rows.float() for rows, _ in acts.mix(chunks, buffer, batch, perm_seed))
    x0 = next(batches)
    d, steps = x0.shape[1], tokens // batch
    ref = PlainTopK(d, expansion * d, k, seed)
    ref.scale = d ** 0.5 / x0.norm(dim=1).mean().item()
    with torch.no_grad():
        ref.b_dec.copy_(x0.mean(0) * ref.scale)
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    start = steps - int(decay * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0, 1 - (1 - end_ratio) *
                                                                 max(s - start, 0) / max(steps - start, 1)))
    for x in tqdm(itertools.islice(itertools.chain([x0], batches), steps), total=steps, unit="step",
                  desc=f"plain topk k={k}", file=sys.stderr, leave=False):
        loss = ref.loss(x * ref.scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return ref.eval()


QUALITY_EVAL = "persuasion.txt.gz"      # the novel that section 7 holds out of training


def bench_quality(a, out: Report) -> dict:
    """nanoSAE's topk and batchtopk at its defaults against PlainTopK on identical activations: a
    cache of a.quality_tokens of the bundled novels but one, written once by train.py; two passes
    over it (nanoSAE in one train.py sweep process, PlainTopK here, on the same batches); all
    evaluated on the first a.quality_eval_tokens of the novel no run saw, with the same contexts
    and metrics (train.py's eval.json; acts.evaluate here). Returns {(name, k): result}."""
    t0, ks, results = time.perf_counter(), a.quality_ks, {}
    with tempfile.TemporaryDirectory() as tmp:
        text = acts.local_folder(acts.EMBEDDED_DATASET)
        for part in ("train", "eval"):
            os.makedirs(os.path.join(tmp, part))
        for name in sorted(os.listdir(text)):
            os.symlink(os.path.join(text, name), os.path.join(tmp, "eval" if name == QUALITY_EVAL else "train", name))
        data = ["--model", a.model, "--hook-point-in", a.hook, "--dataset", os.path.join(tmp, "train"),
                "--eval-dataset", os.path.join(tmp, "eval"), "--eval-tokens", str(a.quality_eval_tokens),
                "--model-dtype", "float32", "--device", a.device, "--model-batch-contexts", str(a.lm_contexts),
                "--batch-size", str(a.quality_batch), "--buffer-size", str(a.quality_buffer)]
        cache = os.path.join(tmp, "cache")
        train_py(data + ["--cache-activations", cache, "--total-training-tokens", str(a.quality_tokens)])
        train_py(data + ["--activations", cache, "--total-training-tokens", str(2 * a.quality_tokens),
                         "--amp-dtype", "float32", "--exp-result-path", os.path.join(tmp, "nanosae"),
                         "--act-fn", "topk", "batchtopk", "--top-k", *map(str, ks)])
        with open(os.path.join(tmp, "nanosae", "sweep.json")) as f:
            for r in json.load(f)["saes"]:
                results[r["act_fn"], r["top_k"]] = r
        refs = [train_plain_topk(cache, k, 2 * a.quality_tokens, a.quality_batch, a.quality_buffer) for k in ks]
        model = acts.load_model(a.model, "float32", a.device)
        contexts = [c for _, c in acts.iter_contexts(lambda: acts.iter_texts(os.path.join(tmp, "eval")), model.tokenizer,
                                                     CONTEXT, held_out=a.quality_eval_tokens // CONTEXT, eval=True)]
        for k, r in zip(ks, acts.evaluate([ref.to(a.device) for ref in refs], model, contexts, a.hook, a.hook,
                                          acts.special_token_ids(model.tokenizer))):
            results["plain topk", k] = r
    out.say(f"{a.quality_tokens:,} tokens of {a.hook} cached in fp32 from the bundled novels but "
            f"{QUALITY_EVAL.split('.')[0].title()}, two passes (batch {a.quality_batch}), "
            f"SAEs in fp32, 8x; evaluated on the first {a.quality_eval_tokens:,} tokens of "
            f"{QUALITY_EVAL.split('.')[0].title()}, which no run saw; {time.perf_counter() - t0:.0f} s wall")
    out.say("nanoSAE: train.py's defaults. plain topk: PlainTopK, the textbook recipe (lr 1e-3, rows at norm "
            "0.5, no AuxK). EV typical: tokens with ||x|| <= 10x the batch median (no massive activations)")
    out.table(["SAE", "k", "EV", "EV typical", "L0", "dead", "CE recovered"],
              [[name, k, f"{r['explained_variance']:.4f}", f"{r['explained_variance_typical']:.4f}",
                f"{r['l0']:.1f}", f"{r['dead']:.3f}", f"{r['ce_loss_recovered']:.4f}"]
               for k in ks for name in ("topk", "batchtopk", "plain topk") for r in [results[name, k]]])
    return results


def settings() -> argparse.Namespace:
    """The flags, and the shapes, repeats and token counts of each section that follow from them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a fast check")
    p.add_argument("--sections", default="matmul,sae,lm,train,analyze,sweep,quality", help="a comma-separated subset")
    p.add_argument("--model", default=acts.EMBEDDED_MODEL, help="the LM of sections 3-7 (a tiny one makes "
                   "--quick a check of the code in seconds, not of the speed)")
    p.add_argument("--hook", default=HOOK, help="the hook point of sections 3-7")
    p.add_argument("--dtypes", default="auto", help="fp32 or fp32,bf16; auto: fp32, and bf16 where the "
                   "device computes it natively")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables and the summary to FILE as "
                   "Markdown, under a description of the machine")
    a = p.parse_args()
    cpu, a.native_bf16 = a.device == "cpu", acts.native_bf16(a.device)
    a.d_model = acts.model_dims(a.model)[1]
    a.dtypes = (["fp32", "bf16"] if a.native_bf16 else ["fp32"]) if a.dtypes == "auto" else a.dtypes.split(",")
    if a.dtypes not in (["fp32"], ["fp32", "bf16"]):
        p.error("--dtypes: fp32, fp32,bf16 or auto")
    # SAE shapes: d = 768 (GPT-2 / Pythia-160M width), batch 4096, k = 64. (warmup, repeats) of the
    # matmuls, and of the SAE steps per expansion: a round of the nine steps is long on a CPU,
    # longest at 32x, so fewer rounds there (too few, and the medians move from run to run).
    a.d, a.batch, a.k, a.expansions = (256, 1024, 32, (8,)) if a.quick else (768, 4096, 64, (8, 32))
    a.reps = (1, 2) if a.quick else (1, 3) if cpu else (5, 20)
    a.sae_reps = {8: a.reps, 32: a.reps} if a.quick or not cpu else {8: (1, 7), 32: (1, 5)}
    # LM: contexts per forward, as train.py's defaults (16 on CPU, 8,192 tokens on a GPU), and repeats.
    a.lm_contexts, a.lm_reps = (2, (1, 1)) if a.quick else (16, (1, 5)) if cpu else (64, (3, 10))
    # train.py: flags, (steps, log frequency); its defaults otherwise (its dtypes too).
    a.train, a.train_steps = (({"batch-size": 256, "buffer-size": 1024, "model-batch-contexts": 2}, (8, 2))
                              if a.quick else ({"batch-size": 1024}, (24, 8) if cpu else (400, 50)))
    # Held-out tokens of each run's evaluation (the --eval-only one is timed): 1 LM batch (quick),
    # 2 on CPU (16 contexts of 128 tokens each), 4 on a GPU.
    a.eval_tokens = 512 if a.quick else 4096 if cpu else 32_768
    # Quality (section 7): tokens cached (each trained on twice), held-out tokens, k, batch and buffer
    # (train.py's defaults but for --quick, where the LM forwards take a.lm_contexts contexts too).
    a.quality_tokens, a.quality_eval_tokens, a.quality_ks, a.quality_batch, a.quality_buffer = (
        (8192, 512, (16,), 256, 1024) if a.quick else (400_000, 32_768, (16, 64), 1024, 16_384))
    return a


def main():
    a = settings()
    sections = a.sections.split(",")
    transformers.utils.logging.disable_progress_bar()        # no "Loading weights" bars
    if a.device == "cpu":   # freed (B, m) tensors stay in the heap, as in train.py at large batches on CPU:
        keep_freed_memory()                     # for every step timed, the references too
    header, out = machine(a), Report()
    print("\n".join(header) + "\n")

    t0, summary, lm_rates = time.perf_counter(), [], {}
    if "matmul" in sections or "sae" in sections:
        out.section("1. matmul roofline")
        roof = bench_matmul(a, out)
        if "bf16" in a.dtypes:
            summary.append("matmul bf16/fp32: " + ", ".join(
                f"m={m} {roof[m, 'bf16'] / roof[m, 'fp32']:.2f}x" for m, dt in roof if dt == "fp32"))
    if "sae" in sections:
        out.section(f"2. SAE training step (d={a.d}, batch {a.batch}, k={a.k})")
        r, tps, like = bench_sae(a, roof, out)
        summary += [f"nanoSAE/dense, expansion {e} {dt}: " + ", ".join(f"{f} {r[f, e, dt]:.2f}x"
                                                                       for f in ACT_FNS + FRESH)
                    for e in a.expansions for dt in a.dtypes]
        summary += [f"nanoSAE/plain dense step of the same act_fn, expansion {e} {dt}: " + ", ".join(
            f"{f} {like[f, e, dt]:.2f}x" for f in ACT_FNS + FRESH if (f, e, dt) in like)
            for e in a.expansions for dt in a.dtypes]
        # The bound on a step that computes the encoder's matmul in its dtype: that matmul alone, at
        # the roofline; and how much of it the topk and batchtopk steps reach (the bound's time over
        # the step's). In fp32 on a CPU with AMX they estimate c in bf16 and can pass it.
        for e in a.expansions:
            bound = {dt: roof[e * a.d, dt] * 1e9 / (2 * a.d * e * a.d) / tps["dense topk (ref)", e, dt]
                     for dt in a.dtypes}
            summary.append(f"encoder matmul alone at the roofline/dense, expansion {e}: " + ", ".join(
                f"{dt} {b:.2f}x" for dt, b in bound.items()) + "; of it, fp32: " + ", ".join(
                f"{f} {r[f, e, 'fp32'] / bound['fp32']:.0%}" for f in ("topk", "batchtopk")))
        # bf16 against fp32 of the same step: the two blocks ran one after the other, not in turns.
        if "bf16" in a.dtypes:
            summary += [f"nanoSAE bf16/fp32, expansion {e}: " + ", ".join(
                f"{f} {tps[f, e, 'bf16'] / tps[f, e, 'fp32']:.2f}x" for f in ACT_FNS + FRESH) for e in a.expansions]
    if "lm" in sections:
        out.section("3. activation generation")
        r, lm_rates = bench_lm(a, out)
        summary.append("bridge/raw HF: " + ", ".join(f"{dt} {v:.2f}x" for dt, v in r.items()))
    if "train" in sections:
        out.section("4. end-to-end train.py")
        r, lm_dtype = bench_train(a, out)
        summary.append(f"train.py end-to-end: streaming {r['streaming']:,.0f} tokens/s, cached {r['cached']:,.0f} "
                       f"tokens/s, cached/streaming {r['cached'] / r['streaming']:.2f}x; held-out evaluation "
                       f"(--eval-only process, LM load included) {r['evaluation']:,.0f} tokens/s")
        if (lm := lm_rates.get({"float32": "fp32", "bfloat16": "bf16"}.get(lm_dtype))):
            both = 1 / (1 / lm + 1 / r["cached"])       # the LM and the rest, one after the other
            summary.append(f"streaming reaches {r['streaming'] / both:.0%} of 1 / (1/LM + 1/cached) = {both:,.0f} "
                           f"tokens/s (LM: section 3's bridge in {lm_dtype}, {lm:,.0f} tokens/s)")
    if "analyze" in sections:
        out.section("5. analyze.py")
        summary.append(f"analyze.py: analysis/LM forward of the same tokens {bench_analyze(a, out):.2f}x")
    if "sweep" in sections:
        out.section("6. a sweep of SAEs against single runs")
        wall, trained = bench_sweep(a, out)
        summary.append(f"sweep/single runs, wall time of the same SAEs: {wall:.2f}x; training time: {trained:.2f}x")
    if "quality" in sections:
        out.section("7. quality: nanoSAE against a plain TopK SAE on identical activations")
        r = bench_quality(a, out)
        summary.append("held-out EV typical, nanoSAE - plain topk: " + ", ".join(
            f"{f} k={k} {r[f, k]['explained_variance_typical'] - r['plain topk', k]['explained_variance_typical']:+.4f}"
            for k in a.quality_ks for f in ("topk", "batchtopk")))
    out.summary(summary)
    out.say(f"total wall time {time.perf_counter() - t0:.0f} s")
    if a.markdown:
        out.write(a.markdown, header)
        print(f"wrote {a.markdown}")


if __name__ == "__main__":
    main()
