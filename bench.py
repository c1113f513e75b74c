"""Benchmarks of nanoSAE: one table per section, every time the median of several repeats after
warmup, with the ratios that matter, and a compact summary of them at the end.

    python bench.py                      # everything (cuda if present, else cpu: 6-9 min on 2 cores)
    python bench.py --quick              # small shapes, few repeats: checks that it all runs (1-3 min)
    python bench.py --device cpu --sections matmul,sae

1. matmul  GFLOP/s of x (B, d) @ W (d, m) in fp32 and bf16 at the SAE's shapes: the roofline.
2. sae     tokens/s and achieved GFLOP/s of nanoSAE's own training step (sae.SAE forward, MSE, the
           sparsity penalty for relu/jumprelu, backward, Adam: train.py's step without AuxK) per
           act_fn, in fp32 and under autocast bf16, next to a plain dense TopK step measured in the
           same run (x @ W_enc + b, topk of relu, dense f @ W_dec + b): the ratio nanoSAE/dense
           (the median over rounds of the steps taking turns), and each step's bf16/fp32. The
           bound on a step that runs the encoder's forward matmul in its dtype: that matmul alone,
           at the roofline, over the reference (fp32 topk and batchtopk on a CPU with AMX run it
           in bf16 and recompute in fp32 only what the selection needs, so they can pass it).
           GFLOP/s counts the FLOPs of the step's dtype; "of roof" compares them with its roofline.
           relu and jumprelu are timed at L0 = k, as a trained SAE fires (sae.py's sparse path),
           and fresh, where about half the latents fire (its dense path); each also next to a
           plain dense step of its own act_fn and penalty (relu with l1; JumpReLU with the paper's
           straight-through estimator and the tanh penalty), which works the same at any L0.
3. lm      activation tokens/s of activations.iter_activations (TransformerBridge, stopping after
           blocks.15.hook_resid_post) on real Austen contexts, fp32 and bf16, next to a raw HF
           forward of the same 16 decoder layers: the ratio bridge/raw.
4. train   end-to-end tokens/s of a short train.main run (LM + mixing buffer + SAE step), read
           from its log.jsonl; and, where train.py has its activation cache, of the same run
           trained from a cache that train.cache_main wrote (no LM while training). Then the
           held-out evaluation of the SAE it saved (train.evaluate: three LM forwards, EV, L0,
           the next-token losses and KL) in tokens/s.
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import activations as acts
import train
from sae import SAE, TANH_C

HOOK = "blocks.15.hook_resid_post"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ACT_FNS = ("relu", "jumprelu", "topk", "batchtopk")
FRESH = ("relu fresh", "jumprelu fresh")        # at a fresh SAE's L0 (~m/2): sae.py's dense path
REFS = ("dense topk (ref)", "plain relu", "plain jumprelu")     # dense_step's


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


def table(header: list[str], rows: list[list]):
    cells = [header] + [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


# --- 1. matmul roofline --------------------------------------------------------------------------


def bench_matmul(a) -> dict:
    roof, rows = {}, []
    for m in (e * a.d for e in a.expansions):
        for name, dt in DTYPES.items():
            x, W = (torch.randn(*shape, dtype=dt, device=a.device) for shape in ((a.batch, a.d), (a.d, m)))
            t = statistics.median(timeit([lambda: x @ W], a.device, *a.reps)[0])
            roof[m, name] = 2 * a.batch * a.d * m / t / 1e9
        rows.append([f"({a.batch}, {a.d}) @ ({a.d}, {m})", roof[m, "fp32"], roof[m, "bf16"],
                     f"{roof[m, 'bf16'] / roof[m, 'fp32']:.2f}x"])
    table(["shape", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16/fp32"], rows)
    return roof


# --- 2. SAE training step: nanoSAE per act_fn vs a dense TopK reference --------------------------


def adam_step(params, loss_fn, autocast, sae: SAE | None = None):
    """One training step: loss_fn() under autocast, backward, Adam: train.py's (train.make_adam)
    for an SAE, torch's default one for the reference."""
    opt, W_enc_T = train.make_adam(sae, 1e-4, 1.0) if sae else (torch.optim.Adam(params, lr=1e-4), None)

    def step():
        with autocast:
            loss = loss_fn()
        for p in params:
            p.grad = None
        loss.backward()
        if sae:
            W_enc_T.grad = sae.W_enc.grad.T
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
        # tokens, L0 = k.
        with torch.no_grad():
            c_q = sae.encode(x).c_BM.float().kthvalue(len(x) - len(x) * a.k // m, dim=0).values
            if act_fn == "relu":
                sae.b_enc -= c_q / sae.W_dec.norm(dim=1)
            else:
                sae.log_threshold.copy_(c_q.clamp(min=1e-3).log())

    def loss_fn():
        y_hat, code = sae(x)
        mse = (y_hat.float() - x).pow(2).sum(-1).mean()
        return mse + 5e-3 * sae.sparsity_loss(code, penalty) if penalty else mse

    @torch.no_grad()
    def l0_and_path():                          # after the timing: not part of the step
        with autocast:
            code = sae(x)[1]
        return code.nnz_per_token().mean().item(), code.f_BM is None
    return adam_step(list(sae.parameters()), loss_fn, autocast, sae), l0_and_path


class PlainJumpReLU(torch.autograd.Function):
    """The textbook JumpReLU, f = h H(h - theta), with the paper's straight-through estimator for
    theta (Rajamanoharan et al. 2024): dL/dtheta = sum_batch dL/df (-theta / eps) 1[|h - theta| < eps/2]."""

    @staticmethod
    def forward(ctx, h, theta, eps):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        window = ((h - theta).abs() < ctx.eps / 2).to(g.dtype)
        return g * (h > theta), (g * window).sum(0) * (-theta / ctx.eps), None


def dense_step(a, act_fn: str, m: int, x, autocast):
    """A plain dense SAE step, written the straightforward way (a dense (B, m) code decoded with a
    dense matmul, plain autograd, torch's default Adam). "topk": the textbook TopK SAE, the
    reference of every row (the code scattered into a zero (B, m) matrix, m*d per token where
    nanoSAE's sparse decode, an embedding_bag, costs k*d). "relu" and "jumprelu": the same
    act_fn and penalty as nanoSAE's step (l1, and tanh with JumpReLU's straight-through
    estimator), its like-for-like reference."""
    W_enc = (torch.randn(a.d, m, device=a.device) / a.d ** 0.5).requires_grad_()
    W_dec = W_enc.detach().T.clone().requires_grad_()
    b_enc, b_dec = (torch.zeros(n, device=a.device, requires_grad=True) for n in (m, a.d))
    log_theta = torch.full((m,), math.log(0.1), device=a.device, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec] + [log_theta] * (act_fn == "jumprelu")

    def loss_fn():
        h_BM = x @ W_enc + b_enc
        if act_fn == "topk":
            vals, idx = F.relu(h_BM).topk(a.k, dim=-1)
            f_BM = torch.zeros_like(h_BM).scatter(-1, idx, vals)
        else:
            f_BM = F.relu(h_BM) if act_fn == "relu" else PlainJumpReLU.apply(h_BM, log_theta.exp(), 0.1)
        loss = (f_BM @ W_dec + b_dec - x).float().pow(2).sum(-1).mean()
        if act_fn != "topk":
            contrib = f_BM * W_dec.norm(dim=1)
            loss = loss + 5e-3 * (contrib if act_fn == "relu" else torch.tanh(TANH_C * contrib)).sum(-1).mean()
        return loss
    return adam_step(params, loss_fn, autocast)


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


def bench_sae(a, roof: dict) -> tuple[dict, dict, dict]:
    """The table; returns {(step, expansion, dtype): nanoSAE/dense topk}, {...: tokens/s} and, for
    relu and jumprelu, {...: nanoSAE/plain dense step of the same act_fn}."""
    ratios, rates, like, rows = {}, {}, {}, []
    x = torch.randn(a.batch, a.d, device=a.device)
    for e in a.expansions:
        m = e * a.d
        for name, dt in DTYPES.items():
            autocast = torch.autocast(torch.device(a.device).type, dtype=dt, enabled=name != "fp32")
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
    table(["step", "expansion", "dtype", "L0", "tokens/s", "GFLOP/s", "of roof", "vs dense topk",
           "vs plain same act_fn"], rows)
    return ratios, rates, like


# --- 3. activation generation: TransformerBridge vs raw HF, same contexts, same layers -----------


def bench_lm(a) -> dict:
    n, ratios, rows = a.lm_contexts, {}, []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        bridge = acts.load_model(acts.EMBEDDED_MODEL, dtype, a.device)
        contexts = acts.iter_contexts(lambda: acts.iter_texts(acts.EMBEDDED_DATASET), bridge.tokenizer, 256)
        batch = [next(contexts) for _ in range(n)]      # tokenized once: both time the forward only
        drop = acts.special_token_ids(bridge.tokenizer)
        raw = transformers.AutoModelForCausalLM.from_pretrained(acts.embedded_model_path(),
                                                                dtype=acts.DTYPES[dtype]).to(a.device).eval()
        raw.model.layers = raw.model.layers[:acts.hook_layer(HOOK) + 1]   # blocks 0..15, as stop_at_layer
        tokens_BT = torch.stack([c for _, c in batch]).to(a.device)

        def bridge_fwd():
            return list(acts.iter_activations(bridge, iter(batch), HOOK, HOOK, drop, n, a.device))
        with torch.no_grad():
            rounds = timeit([bridge_fwd, lambda: raw.model(tokens_BT)], a.device, *a.lm_reps)
        t_bridge, t_raw = map(statistics.median, rounds)
        # Both rates count every position of the contexts (the bridge's output drops BOS, 1 in 256).
        ratios[name] = statistics.median(r / b for b, r in zip(*rounds))     # per round, as in section 2
        rows.append([name, f"{n * 256 / t_bridge:,.0f}", f"{n * 256 / t_raw:,.0f}", f"{ratios[name]:.2f}x"])
        attn = (bridge.original_model.config._attn_implementation, raw.config._attn_implementation)
        bridge = raw = None                             # free both models before the next dtype
    print(f"{n} contexts of 256 tokens per forward, up to {HOOK}; attention: bridge {attn[0]}, raw {attn[1]}")
    table(["dtype", "bridge tokens/s", "raw HF tokens/s", "bridge/raw"], rows)
    return ratios


# --- 4. end-to-end train.py ----------------------------------------------------------------------


def train_tokens_per_s(cfg) -> float:
    """Run train.main(cfg) and read its log.jsonl. The first window is unlike the rest (the
    buffer's first fill came before its clock started): skip it, and pool the others as
    tokens / time (a line holds n tokens at tokens_per_s)."""
    train.main(cfg)
    with open(os.path.join(cfg.exp_result_path, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f][1:]
    return sum(m["n"] for m in lines) / sum(m["n"] / m["tokens_per_s"] for m in lines)


def bench_train(a) -> dict:
    overrides, steps, log_every = a.train
    tokens = steps * overrides.get("batch_size", 1024)
    rates, t = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = dict(overrides, log_frequency=log_every, device=a.device, total_training_tokens=tokens)
        rates["streaming (LM + buffer + SAE)"] = train_tokens_per_s(
            train.Config(**run, exp_result_path=os.path.join(tmp, "streaming")))
        # The activation cache: the LM runs once (cache_main), then training reads the shards.
        if hasattr(train, "cache_main"):
            cache = os.path.join(tmp, "cache")
            train.cache_main(train.Config(**run, cache_activations=cache))
            rates["cached (shards + buffer + SAE)"] = train_tokens_per_s(
                train.Config(**run, activations=cache, exp_result_path=os.path.join(tmp, "cached")))
        # The held-out evaluation that ends every run, of the SAE the streaming run saved (the LM
        # loaded beforehand): a.eval_tokens of held-out text.
        cfg = train.Config(**{**run, "eval_tokens": a.eval_tokens})
        model, drop_ids = train.load_lm(cfg, a.device)
        sae = SAE.load(os.path.join(tmp, "streaming"), a.device)
        t_eval = time.perf_counter()
        n_eval = train.evaluate(sae, model, cfg, drop_ids, a.device)["tokens"]
        rates["held-out evaluation"] = n_eval / (time.perf_counter() - t_eval)
    print(f"{cfg.act_fn}, expansion {cfg.expansion_factor}, batch {cfg.batch_size}, LM {cfg.model_dtype}, "
          f"SAE {cfg.dtype}, {steps} steps per run, evaluation of {cfg.eval_tokens:,} tokens: "
          f"{time.perf_counter() - t:.0f} s wall in all")
    print(f"training: tokens/s of log lines 2..{steps // log_every}; evaluation: kept tokens / its time")
    table(["path", "tokens/s"], [[k, f"{v:,.0f}"] for k, v in rates.items()])
    if "cached (shards + buffer + SAE)" not in rates:
        print("cached path: not available (train.py has no activation cache)\n")
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a fast check")
    p.add_argument("--sections", default="matmul,sae,lm,train", help="a comma-separated subset")
    a = p.parse_args()
    cpu, sections = a.device == "cpu", a.sections.split(",")
    # SAE shapes: d = 768 (GPT-2 / Pythia-160M width), batch 4096, k = 64. (warmup, repeats) of the
    # matmuls, and of the SAE steps per expansion: on 2 CPU cores a round of the nine steps takes
    # ~7 s at 8x and ~20 s at 32x, so 7 rounds at 8x and 5 at 32x (3 left its medians 20% apart).
    a.d, a.batch, a.k, a.expansions = (256, 1024, 32, (8,)) if a.quick else (768, 4096, 64, (8, 32))
    a.reps = (1, 2) if a.quick else (1, 3) if cpu else (5, 20)
    a.sae_reps = {8: a.reps, 32: a.reps} if a.quick or not cpu else {8: (1, 7), 32: (1, 5)}
    # LM: contexts per forward (train.py uses 16 on CPU, where 4 keeps the bench short; on a GPU
    # 8,192 tokens, as train.py's default there) and repeats.
    a.lm_contexts, a.lm_reps = (2, (1, 1)) if a.quick else (4, (1, 9)) if cpu else (32, (3, 10))
    # train.py: Config overrides, steps, log frequency (the default batch is 1024 tokens).
    a.train = (dict(batch_size=256, buffer_size=1024, model_batch_contexts=2, eval_tokens=512), 8, 2) \
        if a.quick else (dict(eval_tokens=512), 24, 8) if cpu else (dict(), 400, 50)
    # The timed evaluation: 2 LM batches (quick), 3 on CPU (16 contexts of 128 tokens), 4 on a GPU.
    a.eval_tokens = 512 if a.quick else 6144 if cpu else 32_768
    transformers.utils.logging.disable_progress_bar()        # no "Loading weights" bars
    if cpu:     # freed memory stays in the heap, as in train.py at large batches on CPU: every
        train.keep_freed_memory()       # step gains, the reference too (~200k page faults a step)
    # Other processes on the machine skew every number: the load average says how busy it was.
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}{', quick' if a.quick else ''}\n")

    t0, summary = time.perf_counter(), []
    if "matmul" in sections or "sae" in sections:
        print("== 1. matmul roofline ==")
        roof = bench_matmul(a)
        summary.append("matmul bf16/fp32: " + ", ".join(
            f"m={m} {roof[m, 'bf16'] / roof[m, 'fp32']:.2f}x" for m, dt in roof if dt == "fp32"))
    if "sae" in sections:
        print(f"== 2. SAE training step (d={a.d}, batch {a.batch}, k={a.k}) ==")
        r, tps, like = bench_sae(a, roof)
        summary += [f"nanoSAE/dense, expansion {e} {dt}: " + ", ".join(f"{f} {r[f, e, dt]:.2f}x"
                                                                       for f in ACT_FNS + FRESH)
                    for e in a.expansions for dt in DTYPES]
        summary += [f"nanoSAE/plain dense step of the same act_fn, expansion {e} {dt}: " + ", ".join(
            f"{f} {like[f, e, dt]:.2f}x" for f in ACT_FNS + FRESH if (f, e, dt) in like)
            for e in a.expansions for dt in DTYPES]
        # The bound on a step that computes the encoder's matmul in its dtype: that matmul alone, at
        # the roofline; and how much of it the topk and batchtopk steps reach (the bound's time over
        # the step's). In fp32 on a CPU with AMX they estimate c in bf16 (sae.estimate_c) and can pass it.
        for e in a.expansions:
            bound = {dt: roof[e * a.d, dt] * 1e9 / (2 * a.d * e * a.d) / tps["dense topk (ref)", e, dt]
                     for dt in DTYPES}
            summary.append(f"encoder matmul alone at the roofline/dense, expansion {e}: " + ", ".join(
                f"{dt} {b:.2f}x" for dt, b in bound.items()) + "; of it, fp32: " + ", ".join(
                f"{f} {r[f, e, 'fp32'] / bound['fp32']:.0%}" for f in ("topk", "batchtopk")))
        # bf16 against fp32 of the same step: the two blocks ran one after the other, not in turns.
        summary += [f"nanoSAE bf16/fp32, expansion {e}: " + ", ".join(
            f"{f} {tps[f, e, 'bf16'] / tps[f, e, 'fp32']:.2f}x" for f in ACT_FNS + FRESH) for e in a.expansions]
    if "lm" in sections:
        print("== 3. activation generation ==")
        r = bench_lm(a)
        summary.append("bridge/raw HF: " + ", ".join(f"{dt} {v:.2f}x" for dt, v in r.items()))
    if "train" in sections:
        print("== 4. end-to-end train.py ==")
        r = list(bench_train(a).values())         # [streaming, cached if there is a cache, evaluation]
        summary.append(f"train.py end-to-end: streaming {r[0]:,.0f} tokens/s" +
                       (f", cached {r[1]:,.0f} tokens/s, cached/streaming {r[1] / r[0]:.2f}x" if len(r) > 2
                        else ", cached path not available") + f"; held-out evaluation {r[-1]:,.0f} tokens/s")
    print("== summary ==\n" + "\n".join(summary))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
