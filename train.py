"""Train a sparse autoencoder (or a transcoder) on a language model's activations.

    python train.py                                           # embedded SmolLM2-135M + Austen, CPU ok
    python train.py --act-fn batchtopk --top-k 64             # one process (GPU if present, else CPU)
    torchrun --nproc_per_node 8 train.py --act-fn topk        # data parallel, same flags
    python train.py --config my_run.toml --lr 2e-4            # a config file; flags override it
    python train.py --total-training-tokens 50_000 --eval-tokens 2048    # a CPU smoke run
    python train.py --resume results/my_run                   # continue from the latest checkpoint
    python train.py --eval-only results/my_run                # evaluate a saved SAE
    python train.py --cache-activations cache/l15             # write the activations once, then
    python train.py --activations cache/l15 --top-k 32        # train from them with no LM forward

The config is one flat dataclass; every field is a flag (--act-fn, --top-k, ...); --help lists them.
main() reads top to bottom: set up the processes, check the settings, then the run folder, open the
activation stream, initialise the SAE, train, save and evaluate.
"""
import contextlib
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist

import activations as acts
from sae import SAE, keep_freed_memory


# The lowest value of each bounded Config field (None, where allowed, means "unset").
AT_LEAST = dict(top_k=1, expansion_factor=1, batch_size=1, context_size=2, model_batch_contexts=1,
                log_frequency=1, keep_checkpoints=1, checkpoint_every=0, checkpoint_minutes=0, eval_every=0,
                aux_k=1, dead_tokens=1, sparsity_coefficient=0, pre_act_loss_coefficient=0, aux_k_coefficient=0,
                sparsity_warmup_steps=0, k_warmup_steps=0, k_cold_booting_steps=0, lr_warmup_steps=0,
                lr_decay_steps=0, lr_end_ratio=0)
ABOVE = dict(lr=0, jumprelu_threshold_window=0, jumprelu_init_threshold=0, jumprelu_lr_factor=0,
             k_exponential_factor=0, max_norm_ratio=1)     # a multiple of the median norm, e.g. 10


@dataclass
class Config:
    # --- language model and text -------------------------------------------------------------
    model: str = acts.EMBEDDED_MODEL
    """LM to hook: the embedded SmolLM2-135M-Instruct (no network needed), or any HF name/path."""
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """dtype of the LM forward; auto = bfloat16 where the device computes it natively (a CUDA GPU
    with bf16, a CPU with AMX or AVX512_BF16), else float32 (elsewhere bf16 is emulated, slowly)."""
    dataset: str = acts.EMBEDDED_DATASET
    """a folder of .txt/.txt.gz/.jsonl files (default: the bundled Austen novels) or an HF dataset."""
    dataset_split: str = "train"
    """split of an HF dataset."""
    text_column: str = "text"
    """column (or .jsonl key) that holds the text."""
    context_size: int = 128
    """tokens per context; each context starts with BOS."""
    model_batch_contexts: int | None = None
    """contexts per LM forward; unset = 16 on CPU, and on a GPU as many as hold 8,192 tokens, at
    least 16 (there a small LM's forward is Python-bound: 2k tokens cost about as much time as 8k)."""
    hook_point_in: str = "blocks.15.hook_resid_post"
    """activation the SAE reads."""
    hook_point_out: str | None = None
    """activation it reconstructs; unset = hook_point_in (an SAE), else a transcoder."""
    ignore_token_ids: list[int] = field(default_factory=list)
    """token ids dropped from training, in addition to BOS, EOS and pad."""
    max_norm_ratio: float | None = None
    """drop tokens with ||x|| > this x the batch median (e.g. 10): "massive activations" (SmolLM2:
    some first tokens after BOS, ~100x the median), which dominate the MSE. None keeps every token."""
    cache_activations: str | None = None
    """write the activation stream (total_training_tokens of it) to this folder and exit."""
    activations: str | None = None
    """train from a cache that --cache-activations wrote: no LM forward while training."""
    eval_tokens: int = 32_768
    """tokens at the start of the data held out for evaluation (never trained on)."""
    eval_dataset: str | None = None
    """evaluate on the first eval_tokens of this dataset instead (then nothing is held out)."""
    eval_every: int = 0
    """steps between held-out evaluations during training (0 = only at the end)."""

    # --- SAE ---------------------------------------------------------------------------------
    act_fn: Literal["relu", "jumprelu", "topk", "batchtopk"] = "topk"
    """activation function."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in."""
    top_k: int = 64
    """k of topk / batchtopk (mean L0 per token)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the SAE parameters."""
    amp_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """autocast dtype of the SAE forward, auto as --model-dtype; parameters stay in --dtype."""
    grid_search_init_norm: bool = True
    """search the decoder-row norm with the lowest initial MSE (else rows start at norm 1)."""
    normalize_activations: bool = True
    """scale x (and y) so that mean ||x|| = sqrt(d); folded into the weights when saving."""

    # --- sparsity ----------------------------------------------------------------------------
    sparsity_loss: Literal["l1", "tanh"] | None = None
    """penalty for relu / jumprelu; unset = l1 for relu, tanh for jumprelu."""
    sparsity_coefficient: float | None = None
    """lambda of the penalty; unset = a default that gives L0 ~ 60 on the embedded default."""
    sparsity_warmup_steps: float = 0.05
    """lambda grows linearly from 0 over these steps (int, or a float in (0, 1): fraction of the run)."""
    pre_act_loss_coefficient: float = 0.0
    """JumpReLU pre-activation loss coefficient (0 = off)."""
    jumprelu_threshold_window: float = 0.1
    """width eps of the straight-through rectangle window around the threshold."""
    jumprelu_init_threshold: float = 0.1
    """initial JumpReLU threshold (in the normalized space)."""
    jumprelu_lr_factor: float = 0.1
    """learning rate of the thresholds = this * lr."""
    use_auxk: bool = True
    """AuxK loss for topk / batchtopk: dead latents learn to model the residual."""
    aux_k: int = 512
    """latents AuxK uses (at most the number of dead ones)."""
    aux_k_coefficient: float = 1 / 32
    """alpha of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """a latent is dead after this many tokens without firing (capped at a tenth of the run)."""

    # --- k schedule (topk / batchtopk) ------------------------------------------------------------
    initial_k: int | None = None
    """start with this k and anneal to top_k; unset = constant k."""
    k_warmup_steps: float = 0.1
    """steps to move k from initial_k to top_k (int, or a float in (0, 1): fraction of the run)."""
    k_cold_booting_steps: float = 0
    """steps to hold k = initial_k before the warmup (int, or fraction of the run)."""
    k_schedule_type: Literal["linear", "exponential"] = "linear"
    """shape of the k warmup."""
    k_exponential_factor: float = 3.0
    """a of the exponential schedule."""

    # --- optimization -------------------------------------------------------------------------
    total_training_tokens: int = 800_000
    """tokens to train on (the data repeats if it is shorter)."""
    batch_size: int = 1024
    """tokens per optimizer step, over all processes."""
    buffer_size: int = 16_384
    """tokens in the mixing buffer of each process (at least 2 batches)."""
    perm_seed: int = 42
    """seed of the mixing buffer's shuffles (rank r uses perm_seed + r)."""
    generator_device: str | None = None
    """device of the shuffling generator; unset = the training device."""
    lr: float = 5e-4
    """Adam learning rate (5e-4: with the massive-activation tokens kept, 1e-3 trains spikier)."""
    lr_warmup_steps: float = 0.01
    """linear lr warmup (int steps, or a fraction of the run)."""
    lr_decay_steps: float = 0.2
    """linear decay at the end of the run to lr * lr_end_ratio."""
    lr_end_ratio: float = 1 / 32
    """final lr / lr."""
    seed: int = 0
    """seed of the SAE's initialization."""
    device: str | None = None
    """cuda when present, else cpu (under torchrun: cuda:LOCAL_RANK)."""

    # --- output ------------------------------------------------------------------------------
    exp_result_path: str = "results/sae"
    """folder for config.json, sae.safetensors, eval.json and checkpoints (--resume: the folder resumed);
    one run at a time (run.lock holds its PID)."""
    log_frequency: int = 50
    """steps between status lines."""
    checkpoint_every: int = 0
    """steps between checkpoints (0 = by time only, and on SIGTERM / SIGINT)."""
    checkpoint_minutes: float = 30
    """minutes between checkpoints, so that a killed long run loses at most this (0 = by steps only)."""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep."""
    wandb_project: str | None = None
    """log to this W&B project (rank 0 only)."""
    exp_name: str | None = None
    """W&B run name (setting it alone also turns W&B on, project "nanosae")."""

    # --- what to do (not part of a run's saved config) -------------------------------------------
    config: str | None = None
    """a .toml/.json/.yaml file of these fields; flags override it."""
    resume: str | None = None
    """continue from a checkpoint file, or the latest readable one of a run folder, writing there."""
    eval_only: str | None = None
    """evaluate this saved SAE folder on held-out text and exit."""

    def __post_init__(self):
        # Checked before any model loads, so a typo costs a second, not a model load.
        # Plain bounds first: each field must be >= (or >) its lowest sensible value.
        for op, bounds in ((">=", AT_LEAST), (">", ABOVE)):
            for name, low in bounds.items():
                v = getattr(self, name)
                if v is not None and (v < low if op == ">=" else v <= low):
                    raise ValueError(f"--{name.replace('_', '-')} must be {op} {low}, got {v}")
        if self.total_training_tokens < self.batch_size:
            raise ValueError(f"--total-training-tokens ({self.total_training_tokens}) must be at "
                             f"least one --batch-size ({self.batch_size})")
        if self.buffer_size < 2 * self.batch_size:
            raise ValueError(f"--buffer-size ({self.buffer_size}) must hold at least two batches "
                             f"(2 * --batch-size = {2 * self.batch_size})")
        if self.eval_tokens < self.context_size:
            raise ValueError(f"--eval-tokens ({self.eval_tokens}) must hold at least one context "
                             f"(--context-size {self.context_size})")
        if self.initial_k is not None and self.initial_k < self.top_k:
            raise ValueError(f"--initial-k ({self.initial_k}) must be >= --top-k ({self.top_k}): "
                             f"the schedule anneals k down to top_k")
        # an option of another activation function would be silently ignored
        topk = self.act_fn in ("topk", "batchtopk")
        for flag, ignored in (("--initial-k", self.initial_k is not None and not topk),
                              ("--sparsity-loss", self.sparsity_loss is not None and topk),
                              ("--sparsity-coefficient", self.sparsity_coefficient is not None and topk),
                              ("--pre-act-loss-coefficient", self.pre_act_loss_coefficient > 0
                               and self.act_fn != "jumprelu")):
            if ignored:
                raise ValueError(f"{flag} does nothing with --act-fn {self.act_fn}: drop it, or pick "
                                 f"the activation function it is for")
        for flag, folder in (("--exp-result-path", self.exp_result_path), ("--cache-activations",
                                                                            self.cache_activations)):
            at = os.path.abspath(folder or ".")         # the folder, or the part of its path that exists
            while not os.path.exists(at):
                at = os.path.dirname(at)
            if not os.path.isdir(at) or not os.access(at, os.W_OK):
                raise ValueError(f"{flag} {folder}: not a folder this process can write to ({at} is "
                                 f"not); give another path")
        for flag, name in (("--dataset", self.dataset), ("--eval-dataset", self.eval_dataset)):
            if name and acts.looks_local(name) and not os.path.isdir(acts.local_folder(name)):
                raise ValueError(f"{flag} {name} does not exist: give a folder of "
                                 f".txt/.txt.gz/.jsonl files or an HF dataset name (owner/name)")

    @property
    def hook_out(self) -> str:
        """the activation the SAE reconstructs: hook_point_out, or hook_point_in for an SAE."""
        return self.hook_point_out or self.hook_point_in

    def lm_batch(self, device: str) -> int:
        """contexts per LM forward: model_batch_contexts, or its default on this device."""
        gpu = max(16, 8192 // self.context_size) if device.startswith("cuda") else 16
        return self.model_batch_contexts or gpu


# Penalty coefficients that give L0 ~ 64 at the defaults on the embedded model (normalized space).
DEFAULT_SPARSITY_COEFFICIENT = {"l1": 2.0, "tanh": 0.5}
# What a cache was made from; a run trains from it only with the same (the held-out text above all).
CACHE_KEYS = ("model", "model_dtype", "hook_point_in", "dataset", "dataset_split", "text_column",
              "context_size", "eval_tokens", "eval_dataset", "ignore_token_ids", "max_norm_ratio")
NOT_SAVED = ("config", "resume", "eval_only", "cache_activations")      # actions, not part of a run


# -------------------------------------------------------------------------------------------------
# schedules


def steps_of(x: float, total_steps: int) -> int:
    """A step count given as an int, or as a float in (0, 1) meaning a fraction of the run."""
    return round(x * total_steps) if 0 < x < 1 else int(x)


def k_at(step: int, cfg: Config, total_steps: int) -> int:
    """k schedule: hold initial_k for the cold boot, then move to top_k over the warmup,
    linearly or exponentially, rounded up and never below top_k. No initial_k: constant."""
    if cfg.initial_k is None:
        return cfg.top_k
    k0, kT = cfg.initial_k, cfg.top_k
    cold, warm = steps_of(cfg.k_cold_booting_steps, total_steps), steps_of(cfg.k_warmup_steps, total_steps)
    p = min(max(step - cold, 0) / max(warm, 1), 1.0)
    if cfg.k_schedule_type == "linear":
        k = k0 + (kT - k0) * p
    else:
        a = cfg.k_exponential_factor
        k = k0 - (k0 - kT) * (1 - math.exp(-a * p)) / (1 - math.exp(-a))
    return max(math.ceil(k - 1e-9), kT)


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warmup, constant, linear decay over the last lr_decay_steps to lr * lr_end_ratio
    at the last step."""
    warm = steps_of(cfg.lr_warmup_steps, total_steps)
    decay = steps_of(cfg.lr_decay_steps, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    left = total_steps - 1 - step                  # steps after this one
    if left < decay:
        return cfg.lr * (cfg.lr_end_ratio + (1 - cfg.lr_end_ratio) * left / decay)
    return cfg.lr


# -------------------------------------------------------------------------------------------------
# small helpers: ranks, printing, files, signals


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def rank_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes; t itself without them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def rank_mean(t: torch.Tensor) -> torch.Tensor:
    """t averaged over the processes (every rank's batch has the same size)."""
    return rank_sum(t) / (dist.get_world_size() if dist.is_initialized() else 1)


def write_json(obj: dict, path: str):
    acts.write_atomic(path, json.dumps(obj, indent=2))


@contextlib.contextmanager
def caught_signals(stop: threading.Event | None = None):
    """SIGTERM and SIGINT within the block. With an Event they set it, and the training loop
    checkpoints and stops at the end of its step; without one they raise KeyboardInterrupt at once
    (an evaluation: a scheduler's kill follows its SIGTERM, and the checkpoint must come first)."""
    def handler(sig, frame):
        if stop is None:
            raise KeyboardInterrupt
        stop.set()
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def code_version() -> dict:
    """The code a run ran, so that a forked, edited run can be traced: a hash of the three files,
    and where they are in git, the commit and whether the work tree differed from it."""
    here, digest = os.path.dirname(os.path.abspath(__file__)), hashlib.sha256()
    for name in ("activations.py", "sae.py", "train.py"):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    code = {"files_sha256": digest.hexdigest()}
    git = ["git", "-C", here, "-c", "safe.directory=*"]
    try:
        run = [subprocess.run(git + args, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
               for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
        code.update(git_commit=run[0], git_dirty=bool(run[1]))
    except (OSError, subprocess.SubprocessError):                  # no git, or not a repository
        pass
    return code


# -------------------------------------------------------------------------------------------------
# checkpoints: one torch.save file per checkpoint, written atomically, so a crash mid-save never
# leaves a broken "latest"


def load_checkpoint(path: str, warn: bool = True) -> dict:
    """A checkpoint file, or the newest readable one in a run folder (or its checkpoints/ folder):
    a newest one cut short (a kill or a full disk mid-write) is passed over with a warning."""
    folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = [path] if os.path.isfile(path) else glob.glob(os.path.join(glob.escape(folder), "step_*.pt"))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected step_*.pt files)")
    error = None
    for file in sorted(found, reverse=True):             # newest first: the step number is zero-padded
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=False)
            assert isinstance(ckpt, dict) and {"sae", "opt", "data", "config"} <= set(ckpt)
        except Exception as e:                           # truncated, corrupt, or not ours
            error = error or f"the checkpoint {file} cannot be read ({type(e).__name__}: {str(e)[:80]})"
            continue
        if error and warn:
            print0(f"warning: {error}; resuming from the one before it, {file}", file=sys.stderr)
        return ckpt
    raise ValueError(f"--resume {path}: {error}")


def resumed_folder(path: str) -> str:
    """The run folder of --resume PATH: PATH, or the folder that a checkpoint file's checkpoints/
    folder is in."""
    folder = os.path.normpath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def save_checkpoint(folder: str, ckpt: dict, keep: int):
    """The checkpoint, then only the newest `keep`. Checkpoints of later steps are of the history
    this run resumed before (one it could not read, or those an explicit --resume FILE went back
    from): this run writes its own."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{ckpt['step']:09d}.pt")
    acts.write_atomic(path, lambda f: torch.save(ckpt, f))
    saved = sorted(glob.glob(os.path.join(glob.escape(folder), "step_*.pt")))
    for old in [f for f in saved if f > path] + [f for f in saved if f <= path][:-keep]:
        os.remove(old)


# -------------------------------------------------------------------------------------------------
# evaluation on held-out contexts


def evaluate(saes: SAE | list[SAE], model, cfg: Config, drop_ids: torch.Tensor,
             device: str) -> dict | list[dict]:
    """acts.evaluate on this run's held-out contexts (the first eval_tokens of the data, never
    trained on, or of --eval-dataset). A list of SAEs gives a list of results."""
    if device == "cpu":     # the LM's logits are large: their pages are not faulted in anew each time
        keep_freed_memory()
    contexts = [c for _, c in acts.iter_contexts(_texts(cfg, cfg.eval_dataset), model.tokenizer, cfg.context_size,
                                                 held_out=cfg.eval_tokens // cfg.context_size, eval=True)]
    results = acts.evaluate([saes] if isinstance(saes, SAE) else saes, model, contexts, cfg.hook_point_in,
                            cfg.hook_out, drop_ids, cfg.lm_batch(device), cfg.max_norm_ratio)
    return results[0] if isinstance(saes, SAE) else results


def print_eval(result: dict, title: str, folder: str | None = None):
    """Print the evaluation table; with a folder, also write it there as eval.json."""
    print0(f"--- {title} ---")
    for k, v in result.items():
        print0(f"  {k:<26s} {v:.4f}" if isinstance(v, float) else f"  {k:<26s} {v}")
    if folder:
        write_json(result, os.path.join(folder, "eval.json"))


# -------------------------------------------------------------------------------------------------
# the language model and its text


def resolve_dtypes(cfg: Config, device: str) -> Config:
    """--model-dtype and --amp-dtype auto: bfloat16 where the device computes it natively, else
    float32 (float16 never by default). The run's files record the choice, not "auto": a resumed
    run, or one from a cache, keeps the dtype its data was made in."""
    auto = "bfloat16" if acts.native_bf16(device) else "float32"
    chosen = {k: auto for k in ("model_dtype", "amp_dtype") if getattr(cfg, k) == "auto"}
    if chosen:
        native = "computes bf16 natively" if auto == "bfloat16" else "has no native bf16"
        print0(f"dtypes: LM forward {chosen.get('model_dtype', cfg.model_dtype)}, SAE step "
               f"{chosen.get('amp_dtype', cfg.amp_dtype)} (auto: this {device} {native})")
    return dataclasses.replace(cfg, **chosen)


def default_device(cfg: Config) -> str:
    """--device, or cuda when present, else cpu; a device this machine lacks is a one-line error."""
    for flag, name in (("--device", cfg.device), ("--generator-device", cfg.generator_device)):
        try:
            dev = torch.device(name or "cpu")
        except RuntimeError:
            raise ValueError(f"{flag} {name}: not a device name (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPUs; "
                             f"leave it unset (cuda when present, else cpu)")
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_lm(cfg: Config, device: str):
    """The LM, and the ids of the tokens that never reach the SAE (BOS, EOS, pad, --ignore-token-ids)."""
    model = acts.load_model(cfg.model, cfg.model_dtype, device)
    return model, acts.special_token_ids(model.tokenizer, cfg.ignore_token_ids)


def check_model_and_data(cfg: Config, training: bool = True) -> int:
    """What can be checked before the weights load: the hook points and the context size against the
    model's config, and that the datasets it reads (the held-out one, and the training one when
    training, unless from a cache) open. Returns d_model."""
    n_layers, d_model, n_ctx = acts.model_dims(cfg.model)
    for hook in (cfg.hook_point_in, cfg.hook_out):
        acts.check_hook_point(hook, n_layers)
    if n_ctx and cfg.context_size > n_ctx:
        raise ValueError(f"--context-size {cfg.context_size} is longer than {cfg.model} takes ({n_ctx} tokens)")
    for dataset in {cfg.eval_dataset or cfg.dataset, *([cfg.dataset] if training and not cfg.activations else [])}:
        next(_texts(cfg, dataset)(), None)     # its first document: a wrong name or --text-column
    return d_model


def _texts(cfg: Config, dataset: str | None = None):
    return lambda: acts.iter_texts(dataset or cfg.dataset, cfg.dataset_split, cfg.text_column)


def train_activations(cfg: Config, model, drop_ids: torch.Tensor, device: str, rank: int = 0,
                      world: int = 1, start: int = 0, passes: int | None = None):
    """acts.iter_activations over this rank's training contexts, from context `start` on. The first
    eval_tokens of the data are held out for evaluation, unless --eval-dataset is given."""
    held_out = 0 if cfg.eval_dataset else cfg.eval_tokens // cfg.context_size
    contexts = acts.iter_contexts(_texts(cfg), model.tokenizer, cfg.context_size, rank, world,
                                  held_out=held_out, start=start, passes=passes)
    return acts.iter_activations(model, contexts, cfg.hook_point_in, cfg.hook_out, drop_ids,
                                 cfg.lm_batch(device), device, cfg.max_norm_ratio)


def check_k(cfg: Config, d_sae: int):
    if max(cfg.top_k, cfg.initial_k or 0) >= d_sae:
        raise ValueError(f"--top-k {cfg.top_k} (and --initial-k, if given) must be below d_sae = {d_sae}")


def folded(sae: SAE, s_in: float, s_out: float) -> SAE:
    """A copy of the SAE that takes raw activations (the normalization folded into it)."""
    raw = SAE(**sae.config(), dtype=sae.W_enc.dtype, device=sae.W_enc.device)
    raw.load_state_dict(sae.state_dict())
    raw.fold_scales_(s_in, s_out)
    return raw


# -------------------------------------------------------------------------------------------------
# logging


def log(m: dict, bar, wandb_run, log_dir: str):
    """The fixed-format status line (rank 0) and the same numbers to log.jsonl and W&B."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    terms = " ".join(f"{k} {m[k]:.4g}" for k in ("mse", "sparsity", "pre_act", "auxk") if k in m)
    line = (f"step {m['step']:6d} | tokens {m['tokens']:,} | loss {m['loss']:.4g} ({terms}) | "
            f"ev {m['explained_variance']:.4f} | l0 {m['l0']:.1f} | dead {m['dead']:.3f} | "
            f"rare {m['ultra_rare']:.3f} | dense {m['dense']:.3f} | k {m['k']} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s")
    bar.write(line + (f" | outliers {m['outliers_dropped']}" if m["outliers_dropped"] else ""))
    with open(os.path.join(log_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    wandb_log(wandb_run, "train", {k: v for k, v in m.items() if k != "n"}, m["step"])


def wandb_log(wandb_run, prefix: str, values: dict, step: int):
    """prefix/name for each number, with our step as a value: the charts' x axis (start_wandb)."""
    if wandb_run:
        wandb_run.log({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()
                                        if k != "step" and not isinstance(v, dict)}})


def progress_bar(total: int, done: int, rank: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, dynamic_ncols=True,
                disable=True if rank else None, file=sys.stderr)


def start_wandb(cfg: Config, ckpt: dict | None):
    """A W&B run (rank 0), started before the model loads, so that a missing login fails fast."""
    import wandb                                 # lazily: only runs that ask for W&B need it
    os.makedirs(cfg.exp_result_path, exist_ok=True)
    run_id = ckpt.get("wandb_id") if ckpt else None
    try:
        run = wandb.init(project=cfg.wandb_project or "nanosae", name=cfg.exp_name, config=run_config(cfg),
                         id=run_id, resume="allow" if run_id else None, dir=cfg.exp_result_path)
    except Exception as e:                          # no login, no network: one line, not a traceback
        raise ValueError(f"W&B cannot start ({' '.join(str(e).split())}): run `wandb login`, or set "
                         f"WANDB_MODE=offline and `wandb sync` later") from None
    # The charts' x axis is our step, logged as a value, not W&B's own step: a run resumed from a
    # checkpoint logs again the steps after it, which W&B would drop as a step going backwards.
    run.define_metric("step")
    for prefix in ("train/*", "eval/*"):
        run.define_metric(prefix, step_metric="step")
    return run


# -------------------------------------------------------------------------------------------------
# config files: flat keys named like the Config fields; command-line flags override them


def run_config(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    if not path.endswith((".toml", ".json", ".yaml", ".yml")):
        raise ValueError(f"--config {path}: use a .toml, .json, .yaml or .yml file")
    with open(path, "rb") as f:
        try:
            if path.endswith(".toml"):
                import tomllib
                values = tomllib.load(f)
            elif path.endswith(".json"):
                values = json.load(f)
            else:
                import yaml
                values = yaml.safe_load(f) or {}
        except Exception as e:                        # a syntax error: name the file, in one line
            raise ValueError(f"--config {path}: cannot be parsed ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: should hold key = value pairs of Config fields, not a "
                         f"{type(values).__name__}")
    values.pop("code", None)              # train_config.json records the code it ran: not a setting
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in fields or key in NOT_SAVED:
            raise ValueError(f"--config {path}: unknown key {key!r} (keys are Config fields, "
                             f"e.g. act_fn, top_k, lr)")
        if not _type_ok(value, fields[key].type):
            raise ValueError(f"--config {path}: {key} = {value!r} should be of type {fields[key].type}")
    return values


def _type_ok(value, tp) -> bool:
    """value fits the Config annotation tp: a Literal, a list, a union (X | None) or a class."""
    if get_origin(tp) is Literal:
        return value in get_args(tp)
    if get_origin(tp) is list:
        return isinstance(value, list) and all(_type_ok(v, get_args(tp)[0]) for v in value)
    if get_args(tp):                                                     # X | None
        return any(_type_ok(value, a) for a in get_args(tp))
    if isinstance(value, bool):                       # a bool is an int to isinstance(), not here
        return tp is bool
    return isinstance(value, (int, float) if tp is float else tp)


def _check_compatible(saved: dict, cfg: Config):
    """A checkpoint continues only the run that wrote it: the fields that shape the SAE, the data
    or the schedule must match."""
    keys = ("model", "model_dtype", "dataset", "dataset_split", "text_column", "activations",
            "ignore_token_ids", "max_norm_ratio", "hook_point_in", "hook_point_out", "act_fn",
            "expansion_factor", "top_k", "initial_k", "k_warmup_steps", "k_cold_booting_steps",
            "k_schedule_type", "k_exponential_factor", "batch_size", "total_training_tokens",
            "context_size", "buffer_size", "perm_seed", "dtype", "eval_tokens", "eval_dataset")
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in keys
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError("--resume: the checkpoint comes from a different run (" + "; ".join(diff) + ")")


def saved_run_config(folder: str) -> dict:
    """The config of the run that saved this SAE folder ({} if SAE.save wrote it alone), less the
    device: --eval-only runs on this machine's."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}                                   # (SAE.load says what is missing)
    with open(path) as f:
        saved = json.load(f).get("train", {})
    return {k: v for k, v in saved.items() if k not in ("device", "generator_device")}


def parse_args(argv: list[str]) -> Config:
    """tyro flags over an optional --config file over the run's own config: when resuming, or
    evaluating a saved SAE (--eval-only)."""
    import tyro
    defaults = {}
    # a resumed run writes into the folder it was given, never the one its checkpoint recorded
    for flag, reader in (("--resume", lambda p: {**load_checkpoint(p, warn=False)["config"],
                                                  "exp_result_path": resumed_folder(p)}),
                         ("--eval-only", saved_run_config), ("--config", read_config_file)):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv) or a.startswith(flag + "="):
                value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
                defaults.update(reader(value))
    return tyro.cli(Config, args=argv, default=Config(**defaults) if defaults else None,
                    description=__doc__)


# -------------------------------------------------------------------------------------------------
# the steps of a run, in the order main() takes them


def setup_processes(cfg: Config) -> tuple[int, int, str]:
    """torchrun sets RANK and WORLD_SIZE (and LOCAL_RANK, which picks the GPU); without them, one
    process. Returns (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        # rank 0 evaluates (--eval-every, the end) while the others wait: NCCL's default timeout of
        # 10 minutes is too short for a large LM's evaluation
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return rank, world, device


def end_processes(world: int):
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def lock_run_folder(folder: str):
    """Rank 0: an advisory lock on folder/run.lock, which holds our PID, so that two runs never
    write into one folder. It is held until this process ends, when the OS releases it, after a
    kill too. A POSIX lock (lockf, not flock): it is the process's, so a process may run main()
    twice in one folder, and network filesystems honour it."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "run.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode().strip() or "unknown"
        os.close(fd)
        raise ValueError(f"{folder} is in use by another run (PID {holder}): let it end, or pick "
                         f"another --exp-result-path") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())      # fd stays open: closing it would drop the lock


def check_run_folder(cfg: Config, rank: int, world: int) -> dict | None:
    """Lock the run folder, and return the checkpoint to resume from, if any, checked against this
    run before the model loads. A new run may not write into a folder that holds another run's
    checkpoints. The partial files of a killed write (*.tmp) are removed: under the lock, no
    running process writes them."""
    folder = glob.escape(cfg.exp_result_path)
    if rank == 0:
        lock_run_folder(cfg.exp_result_path)
        for tmp in glob.glob(os.path.join(folder, "*.tmp")) + glob.glob(os.path.join(folder, "checkpoints", "*.tmp")):
            os.remove(tmp)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    resumed_here = ckpt and os.path.realpath(resumed_folder(cfg.resume)) == os.path.realpath(cfg.exp_result_path)
    if not resumed_here and glob.glob(os.path.join(folder, "checkpoints", "step_*.pt")):
        raise ValueError(f"{cfg.exp_result_path} holds checkpoints of another run: continue it with "
                         f"--resume {cfg.exp_result_path}, or pick another --exp-result-path")
    if ckpt:
        _check_compatible(ckpt["config"], cfg)
        if len(ckpt["data"]) != world:
            raise ValueError(f"--resume: the checkpoint was written by {len(ckpt['data'])} processes, "
                             f"this run has {world}; resume with the same --nproc_per_node")
    return ckpt


def check_data(cfg: Config) -> dict | None:
    """What can be checked before the weights load (and before the run folder is looked at: a bad
    setting is reported as such, whatever the folder holds): the model, hooks, text and k, or the
    cache, which says what it holds. Returns the cache's manifest (None: training from the LM)."""
    d_model = check_model_and_data(cfg)
    if cfg.activations:
        return acts.read_manifest(cfg.activations, {**{k: getattr(cfg, k) for k in CACHE_KEYS},
                                                    "hook_point_out": cfg.hook_out})
    if acts.is_d_model_wide(cfg.hook_point_in):
        check_k(cfg, cfg.expansion_factor * d_model)
    return None


def open_data(cfg: Config, manifest: dict | None, rank: int, device: str):
    """The LM, or a cache of its activations, and the widths of x and y. From a cache the LM loads
    only where it evaluates during training: rank 0, with --eval-every (else at the end).
    Returns (model, drop_ids, d_in, d_out)."""
    if manifest:
        model, drop_ids = load_lm(cfg, device) if cfg.eval_every and rank == 0 else (None, None)
        return model, drop_ids, manifest["d_in"], manifest["d_out"]
    model, drop_ids = load_lm(cfg, device)
    return model, drop_ids, *acts.hook_dims(model, cfg.hook_point_in, cfg.hook_out)


def lm_chunks(cfg: Config, model, drop_ids, device: str, rank: int, world: int, start: dict, sae_only: bool):
    """Chunks of [x, y] rows (x alone for an SAE) from the LM, each with where the stream stands
    after it: the next context to read and the massive activations dropped so far."""
    outliers = start["outliers"]
    for a in train_activations(cfg, model, drop_ids, device, rank, world, start["next_context"]):
        outliers += a["outliers"]
        yield (a["x"] if sae_only else torch.cat([a["x"], a["y"]], dim=1),
               {"next_context": a["last"] + 1, "outliers": outliers})


def activation_stream(cfg: Config, model, drop_ids, manifest, d_in: int, device: str, rank: int,
                      world: int, position: dict):
    """This rank's training batches from `position` on (a checkpoint's, or the start): yields
    (x (B, d_in), y (B, d_out), the position after this batch), in --dtype. The rows are [x, y], or
    x alone for an SAE (y = x: half the memory and copying). Rank r's buffer is seeded perm_seed + r."""
    sae_only = cfg.hook_out == cfg.hook_point_in
    start = {"next_context": position["next_context"], "outliers": position.get("outliers", 0)}
    if cfg.activations:                        # next_context counts the cache's chunks here
        chunks = ((xy.to(device), {"next_context": i + 1, "outliers": 0}) for i, xy in
                  acts.iter_cache(cfg.activations, manifest, cfg.perm_seed, rank, world, start["next_context"]))
    else:
        chunks = lm_chunks(cfg, model, drop_ids, device, rank, world, start, sae_only)
    for xy, mixed in acts.mix(chunks, cfg.buffer_size, cfg.batch_size // world, cfg.perm_seed + rank,
                              cfg.generator_device or device, {**position["mix"], "source": start}):
        xy = xy.to(device, getattr(torch, cfg.dtype))     # (a resumed buffer starts on the CPU)
        source = mixed.pop("source")
        yield xy[:, :d_in], xy if sae_only else xy[:, d_in:], {**source, "mix": mixed}


@dataclass
class RunState:
    """What a run carries from step to step besides the SAE and the optimizer."""
    step: int
    s_in: float                 # normalization: the SAE trains on x * s_in -> y * s_out
    s_out: float
    since_fired: torch.Tensor   # (d_sae,) tokens since each latent last fired


def init_sae(cfg: Config, d_in: int, d_out: int, device: str, world: int, batches, ckpt: dict | None):
    """The SAE and its optimizer: from the checkpoint, or fresh, with the normalization and the
    initialization made from the first batch, which is then trained on too.
    Returns (sae, opt, state, batches)."""
    d_sae = cfg.expansion_factor * d_in
    check_k(cfg, d_sae)
    if device == "cpu" and cfg.batch_size // world * d_sae * 4 > 32 * 2 ** 20:   # large (B, m) tensors
        keep_freed_memory()
    torch.manual_seed(cfg.seed)   # here: every rank starts from the same SAE, whatever loading the LM drew
    sae = SAE(d_in, d_sae, cfg.act_fn, cfg.top_k, d_out, cfg.hook_out != cfg.hook_point_in,
              cfg.jumprelu_threshold_window, cfg.jumprelu_init_threshold,
              dtype=getattr(torch, cfg.dtype), device=device)
    opt = torch.optim.Adam(sae.param_groups(cfg.jumprelu_lr_factor), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    if ckpt:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["rng"])
        print0(f"resumed from step {ckpt['step']} ({cfg.resume})")
        return sae, opt, RunState(ckpt["step"], ckpt["s_in"], ckpt["s_out"], ckpt["since_fired"].to(device)), batches
    first = next(batches)
    x0, y0 = first[0].float(), first[1].float()
    # One dataset-wide constant each for x and y so that mean ||x|| = sqrt(d). Averaged over ranks,
    # like the initial b_dec, so that every rank starts from the same SAE.
    s = torch.tensor([d_in ** 0.5 / x0.norm(dim=1).mean(), d_out ** 0.5 / y0.norm(dim=1).mean()],
                     device=device) if cfg.normalize_activations else torch.ones(2, device=device)
    s_in, s_out = rank_mean(s).tolist()
    with torch.no_grad():
        sae.b_dec.copy_(rank_mean(y0.mean(0)) * s_out)         # initial b_dec = mean of the targets
    if cfg.grid_search_init_norm:
        # each rank's MSE at each r, averaged over ranks: the search sees the global batch and every
        # rank picks the same r (on its own batch alone, the ranks' r would differ)
        sae.train()
        r = sae.grid_search_init_norm_((x0 * s_in).to(sae.W_enc.dtype), y0 * s_out,
                                       k_at(0, cfg, cfg.total_training_tokens // cfg.batch_size), rank_mean)
        sae.threshold.fill_(-1.0)                              # forget the search's batches
        print0(f"grid search: decoder rows start at norm {r:.3f}")
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    return sae, opt, RunState(0, s_in, s_out, since_fired), itertools.chain([first], batches)


def start_run_folder(cfg: Config, resumed_step: int | None):
    """Rank 0: train_config.json (the settings, and the code that ran them) and log.jsonl, which a
    new run starts anew and a resumed one cuts after its checkpoint (and a line cut short by a kill)."""
    os.makedirs(cfg.exp_result_path, exist_ok=True)
    write_json({**run_config(cfg), "code": code_version()}, os.path.join(cfg.exp_result_path, "train_config.json"))
    log_path = os.path.join(cfg.exp_result_path, "log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:
            keep = [l for l in f if resumed_step is not None and l.endswith("\n")
                    and json.loads(l)["step"] <= resumed_step]
        acts.write_atomic(log_path, "".join(keep))


def loss_terms(cfg: Config, sae: SAE, code, y, y_hat, step: int, total_steps: int, dead_M) -> dict:
    """The loss terms of one step, whose sum is the loss: the reconstruction error, and the sparsity
    penalty (and pre-activation loss) of relu / jumprelu, or AuxK of topk / batchtopk."""
    terms = {"mse": (y_hat.float() - y.float()).pow(2).sum(-1).mean()}
    if cfg.act_fn in ("relu", "jumprelu"):
        penalty = cfg.sparsity_loss or ("l1" if cfg.act_fn == "relu" else "tanh")
        coef = DEFAULT_SPARSITY_COEFFICIENT[penalty] if cfg.sparsity_coefficient is None else cfg.sparsity_coefficient
        warm = min(1.0, (step + 1) / max(steps_of(cfg.sparsity_warmup_steps, total_steps), 1))
        terms["sparsity"] = coef * warm * sae.sparsity_loss(code, penalty)
        if cfg.act_fn == "jumprelu" and cfg.pre_act_loss_coefficient > 0:
            terms["pre_act"] = cfg.pre_act_loss_coefficient * sae.pre_act_loss(code)
    elif cfg.use_auxk:
        terms["auxk"] = cfg.aux_k_coefficient * sae.auxk_loss(code, y.float() - y_hat.float(), dead_M, cfg.aux_k)
    return terms


def average_gradients_(sae: SAE, world: int):
    """Each rank's loss is a mean over its own tokens: the global batch's gradient is their mean."""
    if world > 1:
        for p in sae.parameters():
            p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def sync_state_(sae: SAE, fired_M: torch.Tensor, world: int):
    """State that is not a parameter, made identical on every rank explicitly: the firing counts
    that the dead-latent counters read, and BatchTopK's running threshold (each rank selects over
    its own local batch, so each has its own threshold)."""
    if world > 1:
        dist.all_reduce(fired_M)
        if sae.act_fn == "batchtopk":
            dist.all_reduce(sae.threshold)
            sae.threshold /= world


def write_checkpoint(cfg: Config, sae: SAE, opt, st: RunState, position: dict, wandb_run, rank: int, world: int):
    """Every rank's data position, gathered to rank 0, which writes the checkpoint. The mixing
    buffer goes on the CPU, and only its rows: pickled, a view of a GPU tensor is all of its storage."""
    position = {**position, "mix": {k: v.cpu().clone() if k == "buf" else v for k, v in position["mix"].items()}}
    positions = [position]
    if world > 1:
        positions = [None] * world if rank == 0 else None
        dist.gather_object(position, positions, dst=0)
    if rank == 0:
        save_checkpoint(os.path.join(cfg.exp_result_path, "checkpoints"), dict(
            step=st.step, sae=sae.state_dict(), opt=opt.state_dict(), s_in=st.s_in, s_out=st.s_out,
            since_fired=st.since_fired.cpu(), rng=torch.get_rng_state(), data=positions,
            config=run_config(cfg), wandb_id=wandb_run.id if wandb_run else None), cfg.keep_checkpoints)


def evaluate_during_training(cfg: Config, sae: SAE, st: RunState, model, drop_ids, wandb_run,
                             device: str, stop: threading.Event):
    """--eval-every (rank 0). A signal stops it at once and the loop checkpoints: a scheduler's
    kill follows its SIGTERM (torchrun's and Slurm's some 30 s later)."""
    try:
        with caught_signals():
            if stop.is_set():       # a signal that came just before this handler took over
                raise KeyboardInterrupt
            result = evaluate(folded(sae, st.s_in, st.s_out), model, cfg, drop_ids, device)
        print_eval(result, f"held-out evaluation at step {st.step}")
        wandb_log(wandb_run, "eval", result, st.step)
    except KeyboardInterrupt:
        stop.set()
        print0(f"held-out evaluation at step {st.step} stopped by a signal")


def train_loop(cfg: Config, sae: SAE, opt, st: RunState, batches, model, drop_ids, wandb_run,
               rank: int, world: int, device: str) -> RunState:
    """Train until the last step, or a signal (SIGTERM, SIGINT: the step ends, a checkpoint is
    written). Checkpoints every checkpoint_every steps and every checkpoint_minutes."""
    total_steps = cfg.total_training_tokens // cfg.batch_size
    dead_tokens = min(cfg.dead_tokens, cfg.total_training_tokens // 10)
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, cfg.amp_dtype),
                              enabled=cfg.amp_dtype != "float32")
    window, stop, position = acts.Stats(sae.d_out, sae.d_sae, device), threading.Event(), None
    t0 = saved_at = time.time()
    with progress_bar(total_steps * cfg.batch_size, st.step * cfg.batch_size, rank) as bar, caught_signals(stop):
        while st.step < total_steps:
            try:
                x, y, position = next(batches)
            except ValueError as e:  # bad data (a broken line deep in a .jsonl): keep the steps done
                if world > 1 or position is None:   # (under torchrun the other ranks wait in a collective)
                    raise
                write_checkpoint(cfg, sae, opt, st, position, wandb_run, rank, world)
                raise ValueError(f"{e} (checkpoint written at step {st.step}: fix the data, then "
                                 f"--resume {cfg.exp_result_path})") from None
            x, y = x * st.s_in, y * st.s_out
            k, lr = k_at(st.step, cfg, total_steps), lr_at(st.step, cfg, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_factor", 1.0)
            sae.train()
            with autocast:
                y_hat, code = sae(x, k)
                terms = loss_terms(cfg, sae, code, y, y_hat, st.step, total_steps, st.since_fired >= dead_tokens)
                loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients_(sae, world)
            opt.step()
            fired = code.fired(sae.d_sae)
            window.add(y.float(), y_hat.detach().float(), fired, {**terms, "loss": loss})
            sync_state_(sae, fired, world)
            st.since_fired += cfg.batch_size
            st.since_fired[fired > 0] = 0
            st.step += 1
            bar.update(cfg.batch_size)

            if st.step % cfg.log_frequency == 0 or st.step == total_steps:
                m = window.read(rank_sum, world)                 # every rank's tokens and loss terms
                outliers = rank_sum(torch.tensor(float(position["outliers"]), device=device))
                m.update(step=st.step, tokens=st.step * cfg.batch_size, k=k, lr=lr, outliers_dropped=int(outliers),
                         dead=(st.since_fired >= dead_tokens).float().mean().item(),
                         tokens_per_s=m["n"] / (time.time() - t0))
                log(m, bar, wandb_run, cfg.exp_result_path)
                window, t0 = acts.Stats(sae.d_out, sae.d_sae, device), time.time()
            if (cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < total_steps and rank == 0
                    and not stop.is_set()):
                evaluate_during_training(cfg, sae, st, model, drop_ids, wandb_run, device, stop)

            due = cfg.checkpoint_minutes and time.time() - saved_at > 60 * cfg.checkpoint_minutes
            flags = torch.tensor([float(stop.is_set()), float(due), float(not math.isfinite(loss.item()))],
                                 device=device)
            if world > 1:
                dist.all_reduce(flags)          # any rank's signal, clock or nan: every rank agrees
            stop_now, due, diverged = flags.tolist()
            if diverged:                        # no checkpoint of nan weights: the last one stays
                raise FloatingPointError(f"the loss is nan or inf at step {st.step}: lower --lr" + (
                    " or use --amp-dtype bfloat16 (float16 overflows)" if cfg.amp_dtype == "float16" else "") +
                    " (checkpoints written before this step are kept)")
            if stop_now or due or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0):
                saved_at = time.time()
                write_checkpoint(cfg, sae, opt, st, position, wandb_run, rank, world)
                if stop_now:
                    print0(f"stopped by a signal at step {st.step}; checkpoint written, resume with "
                           f"--resume {cfg.exp_result_path}")
                    break
    return st


def check_ranks_agree(sae: SAE, rank: int, world: int):
    """Every rank must hold the same SAE at the end: checked, not assumed."""
    if world > 1:
        flat = torch.cat([p.detach().flatten() for p in sae.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref, flat), f"rank {rank} ended with weights that differ from rank 0's"


def save_and_evaluate(cfg: Config, sae: SAE, st: RunState, model, drop_ids, wandb_run, device: str) -> dict:
    """Rank 0: save the SAE with the normalization folded in (a BatchTopK one also converted to
    JumpReLU, in jumprelu/ beside it), then evaluate on held-out text and write eval.json."""
    extra = {"train": run_config(cfg), "code": code_version(), "norm_scale_in": st.s_in, "norm_scale_out": st.s_out}
    saes, folder = [folded(sae, st.s_in, st.s_out)], os.path.join(cfg.exp_result_path, "jumprelu")
    saes[0].save(cfg.exp_result_path, extra)
    if cfg.act_fn == "batchtopk":
        saes.append(folded(sae, st.s_in, st.s_out).to_jumprelu_())
        saes[1].save(folder, extra)
    elif os.path.exists(os.path.join(folder, "sae.safetensors")):   # an earlier run's, in this folder
        shutil.rmtree(folder)
    # Stopped from here on (Ctrl-C, or a scheduler's SIGTERM, which would kill silently), the run says
    # that its SAE is saved and how to evaluate it.
    try:
        with caught_signals():
            if model is None:   # trained from a cache: the LM is needed only now, once the SAE is saved
                model, drop_ids = load_lm(cfg, device)
            result, *converted = evaluate(saes, model, cfg, drop_ids, device)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"before the evaluation ended; the SAE is saved: evaluate it with "
                                f"--eval-only {cfg.exp_result_path}") from None
    print_eval(result, f"held-out evaluation ({cfg.exp_result_path})", cfg.exp_result_path)
    if converted:
        result["jumprelu"] = converted[0]
        print_eval(result["jumprelu"], f"converted to JumpReLU ({folder})", folder)
    wandb_log(wandb_run, "eval", result, st.step)
    if wandb_run:
        wandb_run.finish()
    return result


def main(cfg: Config) -> dict:
    """One training run: the held-out evaluation's results ({"stopped_at": step} after a signal)."""
    rank, world, device = setup_processes(cfg)
    cfg = resolve_dtypes(cfg, device)
    manifest = check_data(cfg)
    ckpt = check_run_folder(cfg, rank, world)
    wandb_run = start_wandb(cfg, ckpt) if rank == 0 and (cfg.wandb_project or cfg.exp_name) else None
    model, drop_ids, d_in, d_out = open_data(cfg, manifest, rank, device)
    position = ckpt["data"][rank] if ckpt else {"next_context": 0, "outliers": 0, "mix": {}}
    batches = activation_stream(cfg, model, drop_ids, manifest, d_in, device, rank, world, position)
    sae, opt, st, batches = init_sae(cfg, d_in, d_out, device, world, batches, ckpt)
    if rank == 0:
        start_run_folder(cfg, st.step if ckpt else None)
    st = train_loop(cfg, sae, opt, st, batches, model, drop_ids, wandb_run, rank, world, device)
    if st.step < cfg.total_training_tokens // cfg.batch_size:      # stopped by a signal, checkpointed
        end_processes(world)
        return {"stopped_at": st.step}
    check_ranks_agree(sae, rank, world)
    result = save_and_evaluate(cfg, sae, st, model, drop_ids, wandb_run, device) if rank == 0 else {}
    end_processes(world)
    return result


# -------------------------------------------------------------------------------------------------
# the other two commands: write an activation cache, evaluate a saved SAE


def cache_main(cfg: Config) -> dict:
    """--cache-activations DIR: write total_training_tokens of the activation stream (held-out
    contexts excluded) to DIR, so that runs with --activations DIR skip the LM entirely."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--cache-activations runs in one process (the LM forward is the cost); "
                         "train from the cache under torchrun")
    if os.path.exists(os.path.join(cfg.cache_activations, "manifest.json")):       # before the LM loads
        raise ValueError(f"{cfg.cache_activations} already holds a complete cache; train from it "
                         f"with --activations {cfg.cache_activations}")
    device = default_device(cfg)
    cfg = resolve_dtypes(cfg, device)
    check_model_and_data(cfg)
    model, drop_ids = load_lm(cfg, device)
    d_in, d_out = acts.hook_dims(model, cfg.hook_point_in, cfg.hook_out)
    manifest = {k: getattr(cfg, k) for k in CACHE_KEYS}
    manifest.update(hook_point_out=cfg.hook_out, sae=cfg.hook_out == cfg.hook_point_in,
                    d_in=d_in, d_out=d_out)
    with progress_bar(cfg.total_training_tokens, 0, 0) as bar:
        stream = train_activations(cfg, model, drop_ids, device, passes=1)
        manifest = acts.write_cache(cfg.cache_activations, (bar.update(len(a["x"])) or a for a in stream),
                                    manifest, cfg.total_training_tokens)
    print0(f"cached {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards at "
           f"{cfg.cache_activations}; train with --activations {cfg.cache_activations}")
    return manifest


def eval_only(cfg: Config) -> dict:
    """Evaluate the saved SAE folder cfg.eval_only on the held-out text of its run (or on
    --eval-dataset), print the table and write eval.json into the folder. cfg is the run's config
    (parse_args) with the flags given now over it: the model and hook of an SAE saved by SAE.save."""
    folder, sae = cfg.eval_only, SAE.load(cfg.eval_only)
    run = saved_run_config(folder)
    if run and not cfg.eval_dataset:    # its held-out text only: the text of contexts, less their BOS
        def text(context_size, eval_tokens):
            return (context_size - 1) * (eval_tokens // context_size)
        held_out, reads = text(run["context_size"], run["eval_tokens"]), text(cfg.context_size, cfg.eval_tokens)
        for key in ("dataset", "dataset_split", "text_column"):
            if run[key] != getattr(cfg, key):
                raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)}: the run held out text "
                                 f"of {run[key]}; to evaluate on other text, give it as --eval-dataset")
        if reads > held_out:
            raise ValueError(f"--eval-tokens {cfg.eval_tokens} at --context-size {cfg.context_size} reads "
                             f"{reads} tokens of text; the run held out only its first {held_out} (the "
                             f"rest it trained on): ask for fewer, or give --eval-dataset")
    device = default_device(cfg)
    cfg = resolve_dtypes(cfg, device)
    check_model_and_data(cfg, training=False)          # before the LM loads: its hooks, the held-out text
    model, drop_ids = load_lm(cfg, device)
    if (sae.d_in, sae.d_out) != acts.hook_dims(model, cfg.hook_point_in, cfg.hook_out):
        raise ValueError(f"{folder}: the SAE maps {sae.d_in} -> {sae.d_out}, {cfg.model}'s "
                         f"{cfg.hook_point_in} -> {cfg.hook_out} is not that; give --model and --hook-point-in")
    result = evaluate(sae.to(device), model, cfg, drop_ids, device)
    print_eval(result, f"held-out evaluation ({folder})", folder)
    return result


if __name__ == "__main__":
    try:
        cfg = parse_args(sys.argv[1:])
        if cfg.eval_only:
            eval_only(cfg)
        elif cfg.cache_activations:
            cache_main(cfg)
        else:
            main(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError, acts.WriteError) as e:   # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:     # before or after the training loop, which checkpoints first
        print(f"error: interrupted {e}".rstrip(), file=sys.stderr)
        sys.exit(130)
