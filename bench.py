"""Benchmarks of nanoSAE: one table per section; every time is the median of several repeats after
warmup, and each section prints the ratio that matters. A compact summary comes last.

    python bench.py                          # everything (cuda if present, else cpu: minutes on 2 cores)
    python bench.py --quick                  # small shapes, few repeats: checks that it all runs
    python bench.py --device cpu --sections matmul,sae

1. matmul  GFLOP/s of x (B, d) @ W (d, m) in fp32 and bf16 at the SAE's shapes: the roofline.
2. sae     tokens/s and achieved GFLOP/s of nanoSAE's own training step (sae.SAE forward, MSE, the
           sparsity penalty for relu/jumprelu, backward, Adam: what train.py does, minus AuxK) per
           act_fn, in fp32 and under autocast bf16, next to a plain dense TopK step measured in the
           same run (x @ W_enc + b, topk of relu, dense f @ W_dec + b): nanoSAE/dense.
3. lm      activation tokens/s of activations.iter_activations (TransformerBridge, stopping after
           blocks.15.hook_resid_post) on real Austen contexts, in fp32 and bf16, next to a raw HF
           forward of the same 16 decoder layers: bridge/raw.
4. train   end-to-end tokens/s of a short train.main run (LM + buffer + SAE step), from log.jsonl.
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import activations as acts
import train
from sae import SAE

HOOK = "blocks.15.hook_resid_post"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timeit(fn, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup` untimed calls (on CUDA the
    kernels are asynchronous, so synchronize before reading the clock)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(header: list[str], rows: list[list]):
    cells = [header] + [[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


# -------------------------------------------------------------------------------------------------
# 1. matmul roofline


def bench_matmul(a) -> dict:
    rows, roof = [], {}
    for e in a.expansions:
        m = e * a.d
        for name, dt in DTYPES.items():
            x, W = torch.randn(a.batch, a.d, dtype=dt, device=a.device), torch.randn(a.d, m, dtype=dt, device=a.device)
            roof[m, name] = 2 * a.batch * a.d * m / timeit(lambda: x @ W, a.device, *a.reps(m)) / 1e9
        rows.append([f"({a.batch}, {a.d}) @ ({a.d}, {m})", roof[m, "fp32"], roof[m, "bf16"],
                     roof[m, "bf16"] / roof[m, "fp32"]])
    table(["shape", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16/fp32"], rows)
    return roof


# -------------------------------------------------------------------------------------------------
# 2. SAE training step: nanoSAE per act_fn vs a dense TopK reference


def sae_step(a, act_fn: str, m: int, x, autocast):
    sae = SAE(a.d, m, act_fn, a.k, device=a.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    penalty = {"relu": "l1", "jumprelu": "tanh"}.get(act_fn)       # train.py's default penalties

    def step():
        with autocast:
            y_hat, code = sae(x)
            loss = (y_hat.float() - x).pow(2).sum(-1).mean()
            if penalty:
                loss = loss + 5e-3 * sae.sparsity_loss(code, penalty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def dense_step(a, m: int, x, autocast):
    """The textbook TopK SAE: the code is scattered back into a dense (B, m) matrix and decoded
    with a dense matmul, which costs m*d per token where nanoSAE's sparse decode costs k*d."""
    W_enc = (torch.randn(a.d, m, device=a.device) / a.d ** 0.5).requires_grad_()
    W_dec = W_enc.detach().T.clone().requires_grad_()
    b_enc, b_dec = (torch.zeros(n, device=a.device, requires_grad=True) for n in (m, a.d))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)

    def step():
        with autocast:
            h_BM = F.relu(x @ W_enc + b_enc)
            vals, idx = h_BM.topk(a.k, dim=-1)
            f_BM = torch.zeros_like(h_BM).scatter(-1, idx, vals)
            loss = (f_BM @ W_dec + b_dec - x).float().pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_flops(act_fn: str, B: int, d: int, m: int, k: int) -> int:
    """Matmul FLOPs of one step as implemented. Encoder: forward 2Bdm + dW_enc 2Bdm (x needs no
    gradient). Dense decode: forward + dW_dec + df, 3 x 2Bmd. Sparse decode: the same with k for m."""
    return 4 * B * d * m + 6 * B * d * (k if act_fn in ("topk", "batchtopk") else m)


def bench_sae(a, roof: dict) -> dict:
    rows, ratios = [], {}
    x = torch.randn(a.batch, a.d, device=a.device)
    for e in a.expansions:
        m = e * a.d
        for name, dt in DTYPES.items():
            autocast = torch.autocast(torch.device(a.device).type, dtype=dt, enabled=name != "fp32")
            tok_s = {}
            for act_fn in ("dense", "relu", "jumprelu", "topk", "batchtopk"):
                torch.manual_seed(0)
                fn = dense_step(a, m, x, autocast) if act_fn == "dense" else sae_step(a, act_fn, m, x, autocast)
                t = timeit(fn, a.device, *a.reps(m))
                tok_s[act_fn] = a.batch / t
                gflops = step_flops(act_fn, a.batch, a.d, m, a.k) / t / 1e9
                ratios[act_fn, e, name] = tok_s[act_fn] / tok_s["dense"]
                rows.append([act_fn if act_fn != "dense" else "dense topk (ref)", e, name,
                             f"{tok_s[act_fn]:,.0f}", gflops, f"{gflops / roof[m, name]:.0%}",
                             f"{ratios[act_fn, e, name]:.2f}x"])
                del fn                                 # free the (d, m) weights and Adam state
    table(["step", "expansion", "dtype", "tokens/s", "GFLOP/s", "of roof", "vs dense"], rows)
    return ratios


# -------------------------------------------------------------------------------------------------
# 3. activation generation: TransformerBridge vs raw HF, same contexts, same layers


def bench_lm(a) -> dict:
    n = a.lm_contexts
    ratios, rows = {}, []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        bridge = acts.load_model(acts.EMBEDDED_MODEL, dtype, a.device)
        contexts = acts.iter_contexts(lambda: acts.iter_texts(acts.EMBEDDED_DATASET), bridge.tokenizer, 256)
        batch = [next(contexts) for _ in range(n)]     # tokenized once, so both time the forward only
        drop = acts.special_token_ids(bridge.tokenizer)
        t_bridge = timeit(lambda: list(acts.iter_activations(bridge, iter(batch), HOOK, HOOK, drop, n, a.device)),
                          a.device, *a.lm_reps)
        raw = transformers.AutoModelForCausalLM.from_pretrained(acts.embedded_model_path(),
                                                                dtype=acts.DTYPES[dtype]).to(a.device).eval()
        raw.model.layers = raw.model.layers[:acts.hook_layer(HOOK) + 1]  # blocks 0..15, as stop_at_layer
        tokens_BT = torch.stack([c for _, c in batch]).to(a.device)
        with torch.no_grad():
            t_raw = timeit(lambda: raw.model(tokens_BT), a.device, *a.lm_reps)
        # Both rates count every position of the contexts (the bridge's output drops BOS, 1 in 256).
        ratios[name] = t_raw / t_bridge
        rows.append([name, f"{n * 256 / t_bridge:,.0f}", f"{n * 256 / t_raw:,.0f}", f"{ratios[name]:.2f}x"])
        attn = (bridge.original_model.config._attn_implementation, raw.config._attn_implementation)
        del bridge, raw
    print(f"{n} contexts of 256 tokens per forward, up to {HOOK}; attention: bridge {attn[0]}, raw {attn[1]}")
    table(["dtype", "bridge tokens/s", "raw HF tokens/s", "bridge/raw"], rows)
    return ratios


# -------------------------------------------------------------------------------------------------
# 4. end-to-end train.py


def bench_train(a) -> float:
    overrides, steps, log_every = a.train
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train.Config(**overrides, exp_result_path=tmp, log_frequency=log_every, device=a.device,
                           total_training_tokens=steps * overrides.get("batch_size", 1024))
        t = time.perf_counter()
        train.main(cfg)
        wall = time.perf_counter() - t
        with open(os.path.join(tmp, "log.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    # The first window is special (the buffer's first fill happened before its clock started):
    # skip it, and pool the rest as total tokens / total time (each line has n tokens at tokens_per_s).
    steady = lines[1:]
    tok_s = sum(m["n"] for m in steady) / sum(m["n"] / m["tokens_per_s"] for m in steady)
    print(f"{cfg.act_fn}, expansion {cfg.expansion_factor}, batch {cfg.batch_size}, LM in "
          f"{cfg.model_dtype}, SAE in {cfg.dtype}, {steps} steps: {wall:.0f} s wall with load, "
          f"init and eval")
    table(["path", f"tokens/s (log lines 2..{len(lines)})"], [["streaming (LM + buffer + SAE)", f"{tok_s:,.0f}"]])
    # An activation cache (LM run once, SAE trained from disk) would be benchmarked here.
    if not any("cache" in f.name for f in dataclasses.fields(train.Config)):
        print("cached path: not available (train.Config has no activation-cache option)\n")
    return tok_s


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a fast check")
    p.add_argument("--sections", default="matmul,sae,lm,train", help="comma-separated subset")
    a = p.parse_args()
    cpu = a.device == "cpu"
    # SAE shapes: d = 768 (GPT-2 / Pythia-160M width), batch 4096, k = 64. On 2 CPU cores an
    # expansion-32 step takes ~10 s, hence (warmup, repeats) = (1, 3) there.
    a.d, a.batch, a.k, a.expansions = (256, 1024, 32, (8,)) if a.quick else (768, 4096, 64, (8, 32))
    a.reps = lambda m: (1, 2) if a.quick else (1, 3) if cpu else (5, 20)
    # LM: contexts per forward (train.py's default is 16; 4 keeps the CPU bench short), repeats.
    a.lm_contexts, a.lm_reps = (2, (1, 1)) if a.quick else (4, (1, 3)) if cpu else (16, (3, 10))
    # train.py: batch, buffer, contexts per LM forward, held-out tokens, steps, log frequency.
    a.train = (dict(batch_size=256, buffer_size=1024, model_batch_contexts=2, eval_tokens=512), 8, 2) \
        if a.quick else (dict(eval_tokens=4096), 24, 8) if cpu else (dict(), 400, 50)
    sections = a.sections.split(",")
    transformers.utils.logging.disable_progress_bar()       # no "Loading weights" bars
    # Other processes on the machine skew every number: the load average says how busy it was.
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}{' (quick)' if a.quick else ''}\n")

    t0, summary = time.perf_counter(), []
    if "matmul" in sections or "sae" in sections:
        print("== 1. matmul roofline ==")
        roof = bench_matmul(a)
        summary.append("matmul bf16/fp32: " + ", ".join(
            f"m={m} {roof[m, 'bf16'] / roof[m, 'fp32']:.2f}x" for m, dt in roof if dt == "fp32"))
    if "sae" in sections:
        print(f"== 2. SAE training step (d={a.d}, batch {a.batch}, k={a.k}) ==")
        r = bench_sae(a, roof)
        for e in a.expansions:
            summary.append(f"nanoSAE/dense, expansion {e}: " + "; ".join(
                f"{dt} " + " ".join(f"{f} {r[f, e, dt]:.2f}x" for f in ("relu", "jumprelu", "topk", "batchtopk"))
                for dt in DTYPES))
    if "lm" in sections:
        print("== 3. activation generation ==")
        r = bench_lm(a)
        summary.append("bridge/raw HF: " + ", ".join(f"{dt} {v:.2f}x" for dt, v in r.items()))
    if "train" in sections:
        print("== 4. end-to-end train.py ==")
        summary.append(f"train.py end-to-end: {bench_train(a):,.0f} tokens/s")
    print("== summary ==")
    print("\n".join(summary))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
