"""What a trained SAE's latents mean. Stream text through the LM and the saved SAE; for every
latent collect its firing frequency, mean and max activation, its top activating contexts (its
activation on every token around the peak), contexts sampled from lower activation ranges, and,
for outputs in the residual stream, the tokens its decoder direction promotes and suppresses (a
logit-lens reading); write them as one static page that opens from the disk, no server needed
(the page is analyze.html, copied beside the data as index.html).

    python analyze.py results/sae                   # the run's held-out text (what its evaluation read)
    python analyze.py results/sae --tokens 8192     # the first 8,192 tokens of it
    python analyze.py results/sae --dataset data/austen --tokens 100_000     # any text instead

It writes into results/sae/features/ (--out): index.html; summary.js (every latent's frequency,
mean, max, tokens); tokens.js (the text of every token id shown); latents_00000.js, ... (the records
of 256 latents each); density.png (log10 firing frequency). The .js files are JSON in a one-line
wrapper that lets the page load them from the file system. From Python:

    from analyze import load_features
    rec = load_features("results/sae", 123)   # latent 123: freq, mean, max, top, samples, promoted...

A BatchTopK SAE is analysed through its JumpReLU conversion (jumprelu/), per token, as at inference.
BOS, EOS and pad (and the run's ignored ids and massive-activation tokens) are left out, as in training.
"""
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Annotated

import torch
import tyro
from tqdm import tqdm

import activations as acts
from sae import SAE

SHARD = 256          # latents per latents_NNNNN.js file: selecting a latent loads one small file
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analyze.html")    # written as index.html
RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_out",
            "attn.hook_out", "mlp.hook_out")    # outputs that add into the residual stream: the logit lens reads them


@dataclass
class Config:
    sae: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SAE_FOLDER")]
    """a folder that train.py saved (its --exp-result-path), or one SAE.save wrote."""
    dataset: str | None = None
    """text to analyse instead of the run's held-out text: a folder of .txt/.jsonl files or an HF dataset."""
    tokens: int | None = None
    """tokens of text to analyse (default: all of the run's held-out text; 32,768 with --dataset)."""
    top: int = 20
    """top activating contexts kept per latent."""
    samples: int = 10
    """contexts sampled per latent (a seeded reservoir) among its activations within --sample-range."""
    sample_range: tuple[float, float] = (0.1, 0.5)
    """the samples' range, as fractions of the latent's largest activation so far."""
    window: int = 16
    """tokens shown on each side of the token where a latent fires."""
    seed: int = 0
    """seed of the samples."""
    model: str | None = None
    """the LM; unset = the run's (for a folder SAE.save wrote alone: the embedded one)."""
    hook_point_in: str | None = None
    """the activation the SAE reads; unset = the run's."""
    batch_contexts: int = 16
    """contexts per LM forward."""
    device: str | None = None
    """cuda when present, else cpu."""
    out: str | None = None
    """output folder; unset = SAE/features."""

    def __post_init__(self):
        for name in ("top", "samples", "batch_contexts", "tokens"):
            if (getattr(self, name) or 1) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.window < 0 or not 0 <= self.sample_range[0] < self.sample_range[1] <= 1:
            raise ValueError("--window must be >= 0 and --sample-range LOW HIGH within 0 <= LOW < HIGH <= 1")
        if self.dataset and acts.looks_local(self.dataset) and not os.path.isdir(acts.local_folder(self.dataset)):
            raise ValueError(f"--dataset {self.dataset} does not exist: give a folder of .txt/.jsonl files or an HF name")


def plan(cfg: Config) -> dict:
    """What can be read and checked before the LM loads: the SAE (a BatchTopK one's JumpReLU
    conversion), the run's model, hook and text, and how many contexts to read."""
    if not os.path.isdir(cfg.sae):
        raise ValueError(f"{cfg.sae}: no such folder; give the folder a run saved (train.py's --exp-result-path)")
    sae = SAE.load(cfg.sae)                              # a folder without an SAE: a one-line error
    with open(os.path.join(cfg.sae, "config.json")) as f:
        run = json.load(f).get("train", {})
    if sae.act_fn == "batchtopk":                        # per token, as at inference
        conv = os.path.join(cfg.sae, "jumprelu")
        sae = SAE.load(conv) if os.path.exists(os.path.join(conv, "sae.safetensors")) else sae.to_jumprelu_()
    model, hook = cfg.model or run.get("model", acts.EMBEDDED_MODEL), cfg.hook_point_in or run.get("hook_point_in")
    if hook is None:
        raise ValueError(f"{cfg.sae} does not record its hook point (SAE.save alone): give --hook-point-in")
    n_layers, d_model, _ = acts.model_dims(model)
    acts.check_hook_point(hook, n_layers)
    if acts.is_d_model_wide(hook) and sae.d_in != d_model:
        raise ValueError(f"{cfg.sae}: the SAE reads {sae.d_in}-wide activations, {model}'s {hook} is {d_model} "
                         f"wide: it was trained on another model; give --model and --hook-point-in")
    size = run.get("context_size", 128)
    if cfg.dataset or not run:                # any text: its first --tokens
        dataset, n = cfg.dataset or acts.EMBEDDED_DATASET, (cfg.tokens or 32_768) // size
    else:                                     # the held-out text, as train.py's evaluation reads it
        dataset, held = run.get("eval_dataset") or run["dataset"], run["eval_tokens"] // size
        if (n := held if cfg.tokens is None else cfg.tokens // size) > held:
            raise ValueError(f"--tokens {cfg.tokens}: the run held out only {held * size:,} tokens (the rest "
                             f"it trained on); ask for fewer, or give other text with --dataset")
    if n < 1:
        raise ValueError(f"--tokens {cfg.tokens} is less than one context of {size} tokens; ask for more")
    device, dtype = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"), run.get("model_dtype", "float32")
    return dict(sae=sae, model=model, hook=hook, hook_out=run.get("hook_point_out") or hook, dataset=dataset,
                n_contexts=n, context_size=size, device=device, ignore=run.get("ignore_token_ids", []),
                dtype=dtype if dtype != "auto" else "bfloat16" if acts.native_bf16(device) else "float32",
                texts=lambda: acts.iter_texts(dataset, run.get("dataset_split", "train"), run.get("text_column", "text")),
                max_norm_ratio=run.get("max_norm_ratio"))


def read_contexts(tokenizer, p: dict) -> list[torch.Tensor]:
    """The first n_contexts contexts of the text, packed as train.py packs them (BOS first): of the
    run's own text, the held-out contexts its evaluation read."""
    contexts = acts.iter_contexts(p["texts"], tokenizer, p["context_size"], passes=1)
    out = [ctx for _, ctx in itertools.islice(contexts, p["n_contexts"])]
    if len(out) < p["n_contexts"]:
        raise ValueError(f"--tokens {p['n_contexts'] * p['context_size']:,}: {p['dataset']} holds only "
                         f"{len(out) * p['context_size']:,} tokens ({len(out)} contexts of {p['context_size']}); "
                         f"ask for fewer")
    return out


# ---------------------------------------------------------------------------------------------
# streaming statistics: every latent's K best (latent, token) pairs, merged batch by batch


def keep_best(best_MK: torch.Tensor, lat_C: torch.Tensor, score_C: torch.Tensor):
    """Merge candidates (latent lat_C[j], score score_C[j]) into each latent's K best scores best_MK
    (descending, -inf where empty). Returns the new best_MK and src_MK: j >= 0 where candidate j
    took the slot, -1 - s where the old slot s moved there. One sort of the candidates, no loop."""
    M, K = best_MK.shape
    span = float(score_C.max() - score_C.min()) + 1 if len(score_C) else 1.0
    order = (lat_C * span - score_C.double()).argsort()          # grouped by latent, best first
    lat = lat_C[order]
    rank = torch.arange(len(lat), device=lat.device) - torch.searchsorted(lat, lat)
    ok = rank < K
    new_MK, src_MK = torch.full_like(best_MK, -math.inf), torch.full_like(best_MK, -1, dtype=torch.long)
    new_MK[lat[ok], rank[ok]], src_MK[lat[ok], rank[ok]] = score_C[order[ok]], order[ok]
    best, at = torch.cat([best_MK, new_MK], 1).topk(K, dim=1)
    return best, torch.where(at < K, -1 - at, src_MK.gather(1, (at - K).clamp(min=0)))


def update_(store: dict, best: torch.Tensor, src: torch.Tensor, payload):
    """Move the kept entries of store's (M, K, ...) tensors to their new slots, and write the
    payload (a function of the new candidates' indices) into the slots new candidates took."""
    store["score"], new = best, src >= 0
    # the latents whose list changed and kept some old entries (moved to other slots)
    rows = (new.any(1) & ((src < 0) & (best > -math.inf)).any(1)).nonzero().squeeze(1)
    moved = (-1 - src[rows]).clamp(min=0)
    for k, v in payload(src[new]).items():
        t = store[k]
        t[rows] = t[rows].gather(1, moved.view(*moved.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
        t[new] = v


def firing_pairs(code, keep_N: torch.Tensor, M: int):
    """The nonzero activations of a Code (sparse or dense) at kept tokens: key = token * M + latent
    (sorted), token, latent, activation. Work in proportion to L0, not to the number of latents."""
    if code.f_BM is None:
        tok, lat, val = code.rows, code.cols, code.vals
    else:
        tok, lat = code.f_BM.nonzero().unbind(1)
        val = code.f_BM[tok, lat]
    ok = (val > 0) & keep_N[tok]
    key = tok[ok] * M + lat[ok]
    order = key.argsort()                            # (on CPU far faster than sort() of int64)
    return key[order], tok[ok][order], lat[ok][order], val[ok][order].float()


@torch.no_grad()
def collect(model, sae: SAE, contexts: list[torch.Tensor], hook: str, drop_ids: torch.Tensor, top: int = 20,
            samples: int = 10, sample_range=(0.1, 0.5), window: int = 16, seed: int = 0, batch: int = 16,
            max_norm_ratio: float | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Stream the contexts through the LM (up to hook) and the SAE. Returns count, sum, max (M,)
    and two stores, "top" (each latent's `top` largest activations) and "samples" (a seeded
    reservoir: uniform among its activations within sample_range of its max so far), each with
    score, context, pos (M, K) and the window's token ids and activations (M, K, 2 window + 1; -1
    and NaN past the context's ends). Memory does not grow with the text."""
    M, W, T = sae.d_sae, 2 * window + 1, contexts[0].numel()
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)                      # noqa: E731
    stores = [{"score": torch.full((M, K), -math.inf, device=device), "context": z(M, K, dtype=torch.int32),
               "pos": z(M, K, dtype=torch.int32), "ids": z(M, K, W, dtype=torch.int32), "acts": z(M, K, W)}
              for K in (top, samples)]
    count, total, peak = z(M, dtype=torch.float64), z(M, dtype=torch.float64), z(M)
    g, n_tokens, lm_s, t0 = torch.Generator(device).manual_seed(seed), 0, 0.0, time.perf_counter()
    offsets = torch.arange(-window, window + 1, device=device)
    bar = tqdm(total=len(contexts) * T, unit="tok", disable=not progress)
    for c0 in range(0, len(contexts), batch):
        tokens_BT, t = torch.stack(contexts[c0:c0 + batch]).to(device), time.perf_counter()
        x_BTD = acts.run_hooks(model, tokens_BT, [hook])[0]
        lm_s += time.perf_counter() - t
        keep = ~torch.isin(tokens_BT, drop_ids.to(device))                # BOS, EOS, pad, ignored ids
        if max_norm_ratio is not None:        # massive activations, left out as the run left them out
            keep[keep.clone()] = acts.within_norm_ratio(x_BTD[keep], max_norm_ratio)
        key, tok, lat, val = firing_pairs(sae.encode(x_BTD.flatten(0, 1).to(sae.W_enc.dtype)), keep.flatten(), M)
        count += torch.bincount(lat, minlength=M)
        total.index_add_(0, lat, val.double())
        peak = peak.scatter_reduce(0, lat, val, "amax")
        n_tokens, ids_N = n_tokens + int(keep.sum()), tokens_BT.flatten().int()

        def payload(j, tok, lat):           # the windows of candidates j; an activation found by its key
            b, p = tok[j] // T, tok[j] % T
            q = p[:, None] + offsets
            inside, want = (q >= 0) & (q < T), (b[:, None] * T + q.clamp(0, T - 1)) * M + lat[j][:, None]
            at = torch.searchsorted(key, want).clamp(max=len(key) - 1)
            return {"context": (c0 + b).int(), "pos": p.int(), "ids": torch.where(inside, ids_N[want // M], -1),
                    "acts": torch.where(inside, torch.where(key[at] == want, val[at], 0.0), math.nan)}
        # top: the pairs above their latent's K-th best so far
        c = val > stores[0]["score"][lat, -1].clamp(min=0)
        update_(stores[0], *keep_best(stores[0]["score"], lat[c], val[c]), lambda j: payload(j, tok[c], lat[c]))
        # samples: a random key for each pair within range of the max so far; the smallest keys stay
        i = ((val >= sample_range[0] * peak[lat]) & (val <= sample_range[1] * peak[lat])).nonzero().squeeze(1)
        r = -torch.rand(len(i), generator=g, device=device)
        i, r = i[ok := r > stores[1]["score"][lat[i], -1]], r[ok]
        update_(stores[1], *keep_best(stores[1]["score"], lat[i], r), lambda j: payload(j, tok[i], lat[i]))
        bar.update(tokens_BT.numel())
    bar.close()
    return {"count": count, "sum": total, "max": peak, "tokens": n_tokens, "top": stores[0],
            "samples": stores[1], "seconds": time.perf_counter() - t0, "lm_seconds": lm_s}


@torch.no_grad()
def logit_lens(model, sae: SAE, n: int = 10, chunk: int = 1024) -> list[torch.Tensor]:
    """Each decoder direction through the final norm's weight (centred first for a LayerNorm) and the
    unembedding: the ids and logits (M, n) of the n most promoted tokens, then of the n most
    suppressed. The unembedding's bias, the same for every latent, is left out."""
    norm, W_U = model.ln_final.original_component, model.original_model.get_output_embeddings().weight
    out = [[], [], [], []]
    for i in range(0, sae.d_sae, chunk):
        d = sae.W_dec[i:i + chunk].to(W_U)
        d = d - d.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else d
        logits = (d * norm.weight if getattr(norm, "weight", None) is not None else d) @ W_U.T
        for k, (v, ix) in enumerate((logits.topk(n), (-logits).topk(n))):
            out[2 * k].append(ix)
            out[2 * k + 1].append(v if k == 0 else -v)
    return [torch.cat(o).cpu() for o in out]


# ---------------------------------------------------------------------------------------------
# the files


def rounded(t: torch.Tensor, digits: int = 4) -> list:
    """(Nested) lists of floats to `digits` significant digits, rounded in float64 so that they print short."""
    t = t.double()
    return ((t * (scale := 10.0 ** (digits - 1 - t.abs().clamp(min=1e-30).log10().floor()))).round() / scale).tolist()


def js(path: str, name: str, obj):
    """JSON in a one-line wrapper that a page's <script> tag can load from the file system."""
    acts.write_atomic(path, f"nanosaeData({json.dumps(name)}, {json.dumps(obj, separators=(',', ':'))});\n")


def contexts_of(store: dict, window: int) -> list[list[dict]]:
    """Each latent's kept contexts: the window less its part past the context's ends, and `at`,
    where the firing token is in it."""
    ok, pos = (store["score"] > -math.inf).tolist(), store["pos"].tolist()
    ctx, ids, a = store["context"].tolist(), store["ids"].tolist(), rounded(store["acts"])
    return [[{"context": ctx[i][k], "pos": pos[i][k], "at": min(pos[i][k], window), "act": a[i][k][window],
              "ids": [t for t in ids[i][k] if t >= 0], "acts": [v for v in a[i][k] if v == v]}
             for k in range(len(ok[i])) if ok[i][k]] for i in range(len(ok))]


def write(folder: str, stats: dict, lens, tokenizer, meta: dict):
    """The page and its data files, and density.png. The records go out a shard at a time: as
    Python lists, all of a 36,864-latent SAE's contexts would take gigabytes."""
    os.makedirs(folder, exist_ok=True)
    best, freq = stats["top"], stats["count"] / max(stats["tokens"], 1)
    M, W = best["ids"].shape[0], best["ids"].shape[2]
    peaks = torch.where(best["score"] > -math.inf, best["ids"][:, :, W // 2], -1).tolist()  # the tokens it fires on
    summary = {"meta": {**meta, "d_sae": M, "tokens": stats["tokens"], "shard": SHARD, "logit_lens": lens is not None,
                        "seconds": round(stats["seconds"], 2), "lm_seconds": round(stats["lm_seconds"], 2)},
               "freq": rounded(freq), "mean": rounded(stats["sum"] / stats["count"].clamp(min=1)),
               "max": rounded(stats["max"]), "fires": [list(dict.fromkeys(t for t in p if t >= 0))[:5] for p in peaks],
               "promotes": lens[0][:, :3].tolist() if lens is not None else None}
    ids = torch.cat([stats[k]["ids"].flatten() for k in ("top", "samples")] + [t.flatten() for t in (lens or [])[::2]])
    js(os.path.join(folder, "tokens.js"), "tokens", {t: tokenizer.decode([t]) for t in ids.unique().tolist() if t >= 0})
    js(os.path.join(folder, "summary.js"), "summary", summary)
    for s in range(0, M, SHARD):
        part = {k: {name: t[s:s + SHARD] for name, t in stats[k].items()} for k in ("top", "samples")}
        top, samples = contexts_of(part["top"], W // 2), contexts_of(part["samples"], W // 2)
        records = [{"latent": i, "count": int(stats["count"][i]), "freq": summary["freq"][i], "mean": summary["mean"][i],
                    "max": summary["max"][i], "top": top[i - s], "samples": samples[i - s]} for i in range(s, s + len(top))]
        for r in records if lens is not None else []:        # the logit lens: [(token id, logit)]
            r["promoted"] = list(zip(lens[0][r["latent"]].tolist(), rounded(lens[1][r["latent"]])))
            r["suppressed"] = list(zip(lens[2][r["latent"]].tolist(), rounded(lens[3][r["latent"]])))
        js(os.path.join(folder, f"latents_{s // SHARD:05d}.js"), f"latents_{s // SHARD:05d}", records)
    with open(PAGE, "rb") as f:
        acts.write_atomic(os.path.join(folder, "index.html"), f.read())
    density_plot(os.path.join(folder, "density.png"), freq, stats["tokens"], meta["sae"])


def density_plot(path: str, freq: torch.Tensor, n_tokens: int, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax, dead = *plt.subplots(figsize=(7, 3.5)), int((freq == 0).sum())
    ax.hist(freq[freq > 0].log10().numpy(), bins=60, color="#4477aa")
    if dead:                     # log10(0) has no place on the axis: a bar of their own, left of one token
        ax.bar(math.log10(1 / max(n_tokens, 1)) - 0.3, dead, width=0.15, color="#aa3333", label=f"dead: {dead:,}")
    ax.axvline(math.log10(1 / max(n_tokens, 1)), color="#aa3333", ls="--", label="one token of the text")
    ax.axvline(-5, color="#999999", ls=":", label="ultra-rare (< 1e-5)")
    ax.set(xlabel="log10 firing frequency (fraction of tokens)", ylabel="latents", title=f"{title}: {len(freq):,} "
           f"latents, {dead:,} dead (never fired on {n_tokens:,} tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_features(path: str, latent: int | None = None):
    """What the page shows, from Python: with a latent, its record (freq, mean, max, count; top and
    samples: [{context, pos, at, act, ids, acts, text}]; promoted / suppressed: [(id, logit)] and
    their _text); without, {"meta": ..., "latents": [every record]}. path: the features folder, or
    the SAE folder it is in."""
    folder = path if os.path.exists(os.path.join(path, "summary.js")) else os.path.join(path, "features")
    if not os.path.exists(os.path.join(folder, "summary.js")):
        raise FileNotFoundError(f"{path} holds no analysis: run python analyze.py on the SAE folder first")

    def read(name):
        with open(os.path.join(folder, name + ".js")) as f:
            text = f.read()
        return json.loads(text[text.index(",") + 1:text.rindex(")")])
    meta, text = read("summary")["meta"], read("tokens")

    def with_text(rec):
        for c in rec["top"] + rec["samples"]:
            c["text"] = [text[str(t)] for t in c["ids"]]
        for k in ("promoted", "suppressed"):
            rec.update({k + "_text": [text[str(t)] for t, _ in rec[k]]} if k in rec else {})
        return rec
    if latent is not None:
        if not 0 <= latent < meta["d_sae"]:
            raise ValueError(f"latent {latent}: this SAE has latents 0..{meta['d_sae'] - 1}")
        return with_text(read(f"latents_{latent // SHARD:05d}")[latent % SHARD])
    shards = [read(f"latents_{s:05d}") for s in range(math.ceil(meta["d_sae"] / SHARD))]
    return {"meta": meta, "latents": [with_text(r) for s in shards for r in s]}


def main(cfg: Config) -> str:
    """Analyse cfg.sae; returns the folder written."""
    p = plan(cfg)                                             # every check that needs no LM
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(acts.model_path(p["model"]))
    contexts = read_contexts(tokenizer, p)
    model, sae = acts.load_model(p["model"], p["dtype"], p["device"]), p["sae"].to(p["device"])
    if (d_in := acts.hook_dims(model, [p["hook"]])[0]) != sae.d_in:
        raise ValueError(f"{cfg.sae}: the SAE reads {sae.d_in}-wide activations, {p['model']}'s {p['hook']} "
                         f"is {d_in} wide; give --model and --hook-point-in")
    print(f"analysing {len(contexts) * p['context_size']:,} tokens of {p['dataset']} through {cfg.sae} "
          f"({sae.act_fn}, {sae.d_sae:,} latents) at {p['hook']}", flush=True)
    stats = collect(model, sae, contexts, p["hook"], acts.special_token_ids(tokenizer, p["ignore"]), cfg.top,
                    cfg.samples, cfg.sample_range, cfg.window, cfg.seed, cfg.batch_contexts, p["max_norm_ratio"],
                    p["device"], progress=True)
    residual = any(p["hook_out"].endswith(h) for h in RESIDUAL) and sae.d_out == model.cfg.d_model
    folder = cfg.out or os.path.join(cfg.sae, "features")
    write(folder, stats, logit_lens(model, sae) if residual else None, tokenizer,
          {"sae": cfg.sae, "act_fn": sae.act_fn, "model": p["model"], "hook_point_in": p["hook"],
           "hook_point_out": p["hook_out"], "dataset": p["dataset"], "contexts": len(contexts),
           "context_size": p["context_size"], "top": cfg.top, "samples": cfg.samples,
           "sample_range": list(cfg.sample_range), "window": cfg.window})
    print(f"{stats['tokens']:,} tokens in {stats['seconds']:.0f} s (LM forward {stats['lm_seconds']:.0f} s); "
          f"{int((stats['count'] == 0).sum()):,} of {sae.d_sae:,} latents never fired; "
          f"open {os.path.join(folder, 'index.html')}")
    return folder


if __name__ == "__main__":
    try:
        main(tyro.cli(Config, description=__doc__))
    except (ValueError, FileNotFoundError, acts.WriteError) as e:      # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
