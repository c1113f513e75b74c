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
from sae import SAE, SaveError, keep_freed_memory


# The lowest value of each bounded Config field (None, where allowed, means "unset").
AT_LEAST = dict(top_k=1, expansion_factor=1, matryoshka_prefixes=0, batch_size=1, context_size=2, model_batch_contexts=1,
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
    matryoshka_prefixes: int = 0
    """Matryoshka BatchTopK (Bussmann et al. 2025): the loss adds the reconstruction errors of this
    many nested prefixes of the latents, d_sae/2^(n-1), ..., d_sae/2, d_sae (0 = off; topk / batchtopk)."""
    skip_connection: bool = False
    """skip transcoder (Paulo et al. 2025): y_hat gets x W_skip^T added, W_skip trained from zero."""

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
    lr: float | None = None
    """Adam learning rate; unset = 2e-3 for batchtopk (its clipped gradients take it, see
    clip_gradients_), else 1e-3."""
    lr_warmup_steps: float = 0.01
    """linear lr warmup (int steps, or a fraction of the run)."""
    lr_decay_steps: float = 0.5
    """linear decay at the end of the run to lr * lr_end_ratio (int steps, or a fraction of the run)."""
    lr_end_ratio: float = 1 / 32
    """final lr / lr."""
    grad_clip_ratio: float | None = None
    """cap each step's gradient norm at this x its running geometric mean (0 = off); unset = 3, but
    off for topk (see clip_gradients_)."""
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
        if self.grad_clip_ratio is not None and 0 < self.grad_clip_ratio <= 1:
            raise ValueError(f"--grad-clip-ratio must be 0 (off) or above 1, got {self.grad_clip_ratio}")
        if self.initial_k is not None and self.initial_k < self.top_k:
            raise ValueError(f"--initial-k ({self.initial_k}) must be >= --top-k ({self.top_k}): "
                             f"the schedule anneals k down to top_k")
        # an option of another activation function (or of a transcoder) would be silently ignored
        topk = self.act_fn in ("topk", "batchtopk")
        if self.skip_connection and self.hook_out == self.hook_point_in:
            raise ValueError("--skip-connection is for a transcoder (an SAE's would learn the identity): "
                             "give --hook-point-out")
        for flag, ignored in (("--initial-k", self.initial_k is not None and not topk),
                              ("--matryoshka-prefixes", self.matryoshka_prefixes > 0 and not topk),
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

    # The two settings whose default depends on the act_fn, resolved where they are used (here, in
    # __post_init__, tyro would fix them for the default act_fn before --act-fn is read).
    @property
    def learning_rate(self) -> float:
        """lr, or its default for this act_fn."""
        return self.lr if self.lr is not None else 2e-3 if self.act_fn == "batchtopk" else 1e-3

    @property
    def clip_ratio(self) -> float:
        """grad_clip_ratio, or its default for this act_fn (0: off)."""
        return self.grad_clip_ratio if self.grad_clip_ratio is not None else 0 if self.act_fn == "topk" else 3.0

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
# Per-SAE settings. Several values (--top-k 16 32 64) make a sweep: their cartesian product trained
# on one activation stream, one LM forward for all; every other field is shared by its SAEs.
SWEPT = ("act_fn", "top_k", "expansion_factor", "lr", "sparsity_coefficient", "hook_point_in",
         "hook_point_out", "seed", "matryoshka_prefixes", "skip_connection")


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
    lr = cfg.learning_rate
    warm, decay = steps_of(cfg.lr_warmup_steps, total_steps), steps_of(cfg.lr_decay_steps, total_steps)
    if step < warm:
        return lr * (step + 1) / warm
    left = total_steps - 1 - step                  # steps after this one
    if left < decay:
        return lr * (cfg.lr_end_ratio + (1 - cfg.lr_end_ratio) * left / decay)
    return lr


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
def caught_signals(stop: threading.Event | None = None, abandon: threading.Event | None = None):
    """SIGTERM and SIGINT within the block. With an Event they set it, and the training loop
    checkpoints and stops at the end of its step; without one, or while `abandon` is set, they
    raise KeyboardInterrupt at once (an evaluation, or the stream refilling its buffer: a
    scheduler's kill follows its SIGTERM, and the checkpoint must come first)."""
    def handler(sig, frame):
        if stop is None:
            raise KeyboardInterrupt
        stop.set()
        if abandon is not None and abandon.is_set():
            raise KeyboardInterrupt
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
            assert isinstance(ckpt, dict) and {"step", "data"} <= set(ckpt)
            if "sae" in ckpt:                            # written when a run trained one SAE only
                ckpt.update(configs=[ckpt["config"]], saes=[{k: ckpt[k] for k in (
                    "sae", "opt", "s_in", "s_out", "since_fired")}])
            assert {"saes", "configs"} <= set(ckpt)
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


def evaluate_members(members: list, saes: list[list[SAE]], model, drop_ids: torch.Tensor,
                     device: str) -> list[list[dict]]:
    """Each member's raw-space SAEs (saes[i]: its own, and its JumpReLU conversion) on the held-out
    text; the SAEs at one pair of hook points share the LM's clean and zero-ablated forwards."""
    groups, results = {}, [None] * len(members)
    for i, m in enumerate(members):
        groups.setdefault((m.cfg.hook_point_in, m.cfg.hook_out), []).append(i)
    for idx in groups.values():
        out = evaluate([s for i in idx for s in saes[i]], model, members[idx[0]].cfg, drop_ids, device)
        for i in idx:
            results[i], out = out[:len(saes[i])], out[len(saes[i]):]
    return results


def print_eval(result: dict, title: str, folder: str | None = None):
    """Print the evaluation table; with a folder, also write it there as eval.json."""
    print0(f"--- {title} ---")
    for k, v in result.items():
        print0(f"  {k:<26s} {v:.4f}" if isinstance(v, float) else f"  {k:<26s} {v}")
    if folder:
        write_json(result, os.path.join(folder, "eval.json"))


# -------------------------------------------------------------------------------------------------
# the language model and its text


def resolve_dtypes(cfgs: list[Config], device: str) -> list[Config]:
    """--model-dtype and --amp-dtype auto: bfloat16 where the device computes it natively, else
    float32 (float16 never by default). The run's files record the choice, not "auto": a resumed
    run, or one from a cache, keeps the dtype its data was made in."""
    cfg, auto = cfgs[0], "bfloat16" if acts.native_bf16(device) else "float32"
    chosen = {k: auto for k in ("model_dtype", "amp_dtype") if getattr(cfg, k) == "auto"}
    if chosen:
        native = "computes bf16 natively" if auto == "bfloat16" else "has no native bf16"
        print0(f"dtypes: LM forward {chosen.get('model_dtype', cfg.model_dtype)}, SAE step "
               f"{chosen.get('amp_dtype', cfg.amp_dtype)} (auto: this {device} {native})")
    return [dataclasses.replace(c, **chosen) for c in cfgs]


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


def check_model_and_data(cfg: Config, training: bool = True, hooks: list[str] | None = None) -> int:
    """What can be checked before the weights load: the hook points (cfg's, or `hooks`) and the
    context size against the model's config, and that the datasets it reads (the held-out one, and
    the training one when training, unless from a cache) open. Returns d_model."""
    n_layers, d_model, n_ctx = acts.model_dims(cfg.model)
    for hook in hooks or (cfg.hook_point_in, cfg.hook_out):
        acts.check_hook_point(hook, n_layers)
    if n_ctx and cfg.context_size > n_ctx:
        raise ValueError(f"--context-size {cfg.context_size} is longer than {cfg.model} takes ({n_ctx} tokens)")
    for dataset in {cfg.eval_dataset or cfg.dataset, *([cfg.dataset] if training and not cfg.activations else [])}:
        next(_texts(cfg, dataset)(), None)     # its first document: a wrong name or --text-column
    return d_model


def _texts(cfg: Config, dataset: str | None = None):
    return lambda: acts.iter_texts(dataset or cfg.dataset, cfg.dataset_split, cfg.text_column)


def train_activations(cfg: Config, hooks: list[str], model, drop_ids: torch.Tensor, device: str,
                      rank: int = 0, world: int = 1, start: int = 0, passes: int | None = None):
    """acts.iter_activations at `hooks` over this rank's training contexts, from context `start` on.
    The first eval_tokens of the data are held out for evaluation, unless --eval-dataset is given."""
    held_out = 0 if cfg.eval_dataset else cfg.eval_tokens // cfg.context_size
    contexts = acts.iter_contexts(_texts(cfg), model.tokenizer, cfg.context_size, rank, world,
                                  held_out=held_out, start=start, passes=passes)
    return acts.iter_activations(model, contexts, hooks, drop_ids, cfg.lm_batch(device), device,
                                 cfg.max_norm_ratio)


def stream_hooks(cfgs: list[Config]) -> list[str]:
    """The hook points the activation stream carries, each once: the SAEs' inputs, then their
    targets. The first is where --max-norm-ratio measures norms."""
    return list(dict.fromkeys([c.hook_point_in for c in cfgs] + [c.hook_out for c in cfgs]))


def free_memory(device: str) -> int:
    """Bytes this device has free: the GPU's, or the memory Linux says is available."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(cfgs: list[Config], widths: dict[str, int], device: str):
    """Before the LM loads, an estimate against the memory the device has free: every SAE's weights
    with their gradients and Adam's two moments, the largest step's (B, d_sae) tensors (the SAEs
    step one after another), and the mixing buffer as it refills. Hooks of unknown width (not
    d_model wide, before the LM loads) are left out."""
    size = 4 if cfgs[0].dtype == "float32" else 2
    weights = step = 0
    for c in cfgs:
        if c.hook_point_in in widths and c.hook_out in widths:
            d_in, d_out = widths[c.hook_point_in], widths[c.hook_out]
            weights += 4 * size * c.expansion_factor * d_in * (d_in + d_out + 2)
            step = max(step, 4 * 4 * c.batch_size * c.expansion_factor * d_in)
    buffer = 2 * 4 * cfgs[0].buffer_size * sum(widths.values())
    need, free = weights + step + buffer, free_memory(device)
    if need > free:
        gib = lambda b: f"{b / 2 ** 30:.1f} GiB"
        raise ValueError(f"this run needs about {gib(need)} besides the LM ({len(cfgs)} SAE(s) with Adam "
                         f"{gib(weights)}, a step {gib(step)}, the buffer {gib(buffer)}) and the {device} has "
                         f"{gib(free)} free: train fewer SAEs at once, or lower --expansion-factor, "
                         f"--batch-size or --buffer-size")


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


def log(m: dict, bar, wandb_run, log_dir: str, name: str = ""):
    """The fixed-format status line (rank 0) and the same numbers to log.jsonl and W&B (a sweep's
    SAE: its name first, and its name/ before its W&B metrics)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    terms = " ".join(f"{k} {m[k]:.4g}" for k in ("mse", "sparsity", "pre_act", "auxk") if k in m)
    line = (f"step {m['step']:6d} | tokens {m['tokens']:,} | loss {m['loss']:.4g} ({terms}) | "
            f"ev {m['explained_variance']:.4f} | l0 {m['l0']:.1f} | dead {m['dead']:.3f} | "
            f"rare {m['ultra_rare']:.3f} | dense {m['dense']:.3f} | k {m['k']} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s")
    bar.write((f"{name} | " if name else "") + line +
              (f" | outliers {m['outliers_dropped']}" if m["outliers_dropped"] else ""))
    with open(os.path.join(log_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    wandb_log(wandb_run, name + "/train" if name else "train", {k: v for k, v in m.items() if k != "n"}, m["step"])


def wandb_log(wandb_run, prefix: str, values: dict, step: int):
    """prefix/name for each number, with our step as a value: the charts' x axis (start_wandb)."""
    if wandb_run:
        wandb_run.log({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()
                                        if k != "step" and not isinstance(v, dict)}})


def progress_bar(total: int, done: int, rank: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, dynamic_ncols=True,
                disable=True if rank else None, file=sys.stderr)


def start_wandb(cfgs: list[Config], ckpt: dict | None):
    """A W&B run (rank 0), started before the model loads, so that a missing login fails fast.
    A sweep is one W&B run: the shared config, the SAEs' settings listed, their metrics prefixed."""
    import wandb                                 # lazily: only runs that ask for W&B need it
    cfg = cfgs[0]
    os.makedirs(cfg.exp_result_path, exist_ok=True)
    run_id = ckpt.get("wandb_id") if ckpt else None
    config = run_config(cfg) if len(cfgs) == 1 else {**run_config(cfg), "sweep": {
        name: {k: getattr(c, k) for k in SWEPT} for name, c in zip(sweep_names(cfgs), cfgs)}}
    try:
        run = wandb.init(project=cfg.wandb_project or "nanosae", name=cfg.exp_name, config=config,
                         id=run_id, resume="allow" if run_id else None, dir=cfg.exp_result_path)
    except Exception as e:                          # no login, no network: one line, not a traceback
        raise ValueError(f"W&B cannot start ({' '.join(str(e).split())}): run `wandb login`, or set "
                         f"WANDB_MODE=offline and `wandb sync` later") from None
    # The charts' x axis is our step, logged as a value, not W&B's own step: a run resumed from a
    # checkpoint logs again the steps after it, which W&B would drop as a step going backwards.
    # (W&B takes globs only as suffixes: a sweep names each SAE's prefix.)
    run.define_metric("step")
    for name in [""] if len(cfgs) == 1 else [n + "/" for n in sweep_names(cfgs)]:
        for part in ("train/*", "eval/*"):
            run.define_metric(name + part, step_metric="step")
    return run


# -------------------------------------------------------------------------------------------------
# config files: flat keys named like the Config fields; command-line flags override them


def run_config(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}


def read_config_file(path: str) -> dict:
    """Config fields from a .toml/.json/.yaml file; a list `saes` of tables of per-SAE settings
    (SWEPT) makes a sweep of exactly those SAEs."""
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
    if any(isinstance(v, dict) for v in values.values()):     # sections: the reference system's layout
        values = from_reference_sections(values, path)
    saes = values.pop("saes", None)
    if saes is not None and not (isinstance(saes, list) and saes and all(isinstance(s, dict) for s in saes)):
        raise ValueError(f"--config {path}: saes should be a list of tables of per-SAE settings")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for where, table, allowed in [("", values, set(fields) - set(NOT_SAVED))] + [
            (f"saes[{i}].", s, SWEPT) for i, s in enumerate(saes or [])]:
        for key, value in table.items():
            if key not in allowed:
                raise ValueError(f"--config {path}: unknown key {where}{key!r} (" + (
                    "keys are Config fields, e.g. act_fn, top_k, lr)" if not where else
                    f"an SAE of a sweep sets only {', '.join(SWEPT)}; the rest is shared: set it above)"))
            if not _type_ok(value, fields[key].type):
                raise ValueError(f"--config {path}: {where}{key} = {value!r} should be of type {fields[key].type}")
    return {**values, "saes": saes} if saes else values


def from_reference_sections(values: dict, path: str) -> dict:
    """A train_config.toml of the reference system (Language-Model-SAEs), whose settings sit in
    sections ([sae], [initializer], [trainer], [model], [datasets."NAME"], [activation_factory] with
    its sources and buffer_shuffle), as our flat fields; "torch.float32" is float32. sae_name,
    sae_series and the top-level model_name label its records (here, the folder does). A key with
    no counterpart here is an error that names it, never a silent drop."""
    fields, flat, unknown = {f.name for f in dataclasses.fields(Config)} - set(NOT_SAVED), {}, []

    def take(table: dict, where: str, names: dict = {}):
        for key, value in table.items():
            name = names.get(key, {"device_type": "device", "l1_coefficient": "sparsity_coefficient"}.get(key, key))
            if name in fields:
                flat[name] = value.removeprefix("torch.") if isinstance(value, str) else value
            else:
                unknown.append(where + key)
    for label in ("sae_name", "sae_series", "model_name"):
        values.pop(label, None)
    sae, af, datasets = (values.pop(k, {}) for k in ("sae", "activation_factory", "datasets"))
    sae.pop("d_model", None)                                   # (read from the model here)
    if sae.pop("sae_type", "sae") not in ("sae", "transcoder") or af.pop("target", "activations-1d") != "activations-1d":
        unknown.append("sae.sae_type or activation_factory.target (here: sae or transcoder, of activations-1d)")
    hooks, sources = af.pop("hook_points", []), af.pop("sources", [])
    take(af.pop("buffer_shuffle", {}), "activation_factory.buffer_shuffle.")
    for section, table in [("sae", sae), ("activation_factory", af)] + [(k, values.pop(k, {})) for k in (
            "initializer", "trainer", "model")]:
        take(table, section + ".", {"model_name": "model", "dtype": "model_dtype"} if section == "model" else {})
    take(values, "")
    for source in sources:
        if source.get("type") != "dataset" or source.get("name") not in datasets:
            unknown.append(f"activation_factory.sources {source} (here: one dataset of [datasets])")
        else:
            take(datasets[source["name"]], f"datasets.{source['name']}.", {"dataset_name_or_path": "dataset"})
    unknown += [f"activation_factory.hook_points {h}" for h in hooks
                if h not in (flat.get("hook_point_in"), flat.get("hook_point_out"))]
    if unknown:
        raise ValueError(f"--config {path}: nanoSAE has no counterpart of {', '.join(unknown)}")
    return flat


def expand_grid(argv: list[str]) -> list[list[str]]:
    """argv with the per-SAE flags given several values (--top-k 16 32 --act-fn topk batchtopk)
    spread into one argv per point of their cartesian product; without any, [argv]. A swept switch
    takes true / false (--skip-connection false true), which become tyro's --flag / --no-flag."""
    fixed, swept, i = [], [], 0
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    while i < len(argv):
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        flag, name, values = argv[i], argv[i][2:].replace("-", "_"), argv[i + 1:j]
        switch = fields.get(name) is bool and name in SWEPT and values
        if flag.startswith("--") and (len(values) > 1 or switch) and get_origin(fields.get(name)) is not list:
            if name not in SWEPT:
                raise ValueError(f"{flag} takes one value: the SAEs of a sweep share it (per SAE, "
                                 f"several values: {', '.join('--' + k.replace('_', '-') for k in SWEPT)})")
            if switch and not {v.lower() for v in values} <= {"true", "false"}:
                raise ValueError(f"{flag} {' '.join(values)}: give true or false (both: a sweep)")
            swept.append([[flag] if v.lower() == "true" else ["--no-" + flag[2:]] for v in values] if switch
                         else [[flag, v] for v in values])
        else:
            fixed += argv[i:j]
        i = j
    return [fixed + [a for args in point for a in args] for point in itertools.product(*swept)]


def sweep_names(cfgs: list[Config]) -> list[str]:
    """Each SAE's name: the settings in which it differs from the others (topk-k16); "" alone. A
    target equal to the input goes unsaid."""
    def part(c, k):
        v = getattr(c, k)
        if k == "hook_point_out":
            return f"to-{v}" if v and v != c.hook_point_in else ""
        if k == "skip_connection":
            return "skip" if v else "noskip"
        return dict(top_k="k", expansion_factor="x", lr="lr", sparsity_coefficient="s", seed="seed",
                    matryoshka_prefixes="mat").get(k, "") + str(v)
    varying = [k for k in SWEPT if len({getattr(c, k) for c in cfgs}) > 1]
    return ["-".join(p for k in varying if (p := part(c, k))) or ("sae" if varying else "") for c in cfgs]


def check_sweep(cfgs: list[Config]):
    """The SAEs of a sweep differ from each other, share every setting but SWEPT, and can share one
    activation stream."""
    names = sweep_names(cfgs)
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"the sweep has the SAE {name or 'of these settings'} twice: give each setting once")
    for c in cfgs[1:]:
        differ = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config)
                  if f.name not in SWEPT and getattr(c, f.name) != getattr(cfgs[0], f.name)]
        if differ:
            raise ValueError(f"{', '.join(differ)}: the SAEs of a sweep share it; set it once")
    if cfgs[0].max_norm_ratio is not None and len({c.hook_point_in for c in cfgs}) > 1:
        raise ValueError("--max-norm-ratio drops tokens by their norm at the input hook, which the SAEs "
                         "of one stream share: sweep one --hook-point-in per run with it")


def resumed_configs(path: str) -> dict:
    """The settings of each SAE of the checkpointed run, writing into the folder of --resume PATH."""
    folder = resumed_folder(path)
    return {"saes": [{**c, "exp_result_path": folder} for c in load_checkpoint(path, warn=False)["configs"]]}


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
            "expansion_factor", "top_k", "initial_k", "matryoshka_prefixes", "skip_connection",
            "k_warmup_steps", "k_cold_booting_steps", "k_schedule_type", "k_exponential_factor", "batch_size",
            "total_training_tokens", "context_size", "buffer_size", "perm_seed", "dtype", "eval_tokens", "eval_dataset",
            "grad_clip_ratio")
    saved = {k: saved.get(k, getattr(Config, k, None)) for k in keys}    # (a field added since: its default)
    diff = [f"{k}: checkpoint {saved[k]!r}, now {getattr(cfg, k)!r}" for k in keys if saved[k] != getattr(cfg, k)]
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


def parse_args(argv: list[str]) -> list[Config]:
    """tyro flags over an optional --config file over the run's own config: when resuming, or
    evaluating a saved SAE (--eval-only). One Config per SAE: several values of a per-SAE flag, or
    a config file's `saes` list, make a sweep."""
    import tyro
    defaults, saes = {}, [{}]
    # a resumed run writes into the folder it was given, never the one its checkpoint recorded
    for flag, reader in (("--resume", resumed_configs), ("--eval-only", saved_run_config),
                         ("--config", read_config_file)):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv) or a.startswith(flag + "="):
                values = reader(a.split("=", 1)[1] if "=" in a else argv[i + 1])
                saes = values.pop("saes", saes)
                defaults.update(values)
    return [tyro.cli(Config, args=args, default=Config(**{**defaults, **sae}), description=__doc__)
            for sae in saes for args in expand_grid(argv)]


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


def check_run_folder(cfgs: list[Config], rank: int, world: int) -> dict | None:
    """Lock the run folder, and return the checkpoint to resume from, if any, checked against this
    run before the model loads. A new run may not write into a folder that holds another run's
    checkpoints. The partial files of a killed write (*.tmp) are removed: under the lock, no
    running process writes them."""
    cfg = cfgs[0]
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
        if len(ckpt["configs"]) != len(cfgs):
            raise ValueError(f"--resume: the checkpoint holds {len(ckpt['configs'])} SAE(s), this run "
                             f"trains {len(cfgs)}; resume with the settings it was started with")
        for saved, c in zip(ckpt["configs"], cfgs):
            _check_compatible(saved, c)
        if len(ckpt["data"]) != world:
            raise ValueError(f"--resume: the checkpoint was written by {len(ckpt['data'])} processes, "
                             f"this run has {world}; resume with the same --nproc_per_node")
    return ckpt


def check_data(cfgs: list[Config], device: str) -> dict | None:
    """What can be checked before the weights load (and before the run folder is looked at: a bad
    setting is reported as such, whatever the folder holds): the sweep, the model, hooks, text, k
    and memory, or the cache, which says what it holds. Returns the cache's manifest (None: training
    from the LM)."""
    cfg, hooks = cfgs[0], stream_hooks(cfgs)
    check_sweep(cfgs)
    d_model = check_model_and_data(cfg, hooks=hooks)
    manifest = None
    if cfg.activations:
        manifest = acts.read_manifest(cfg.activations, {k: getattr(cfg, k) for k in CACHE_KEYS if k != "hook_point_in"})
        have = acts.cache_columns(manifest)
        if [h for h in hooks if h not in have] or cfg.max_norm_ratio is not None and manifest["hook_point_in"] != hooks[0]:
            raise ValueError(f"--activations {cfg.activations}: the cache holds {', '.join(have)} (norms "
                             f"measured at {manifest['hook_point_in']}), this run reads {', '.join(hooks)}")
    widths = acts.cache_columns(manifest) if manifest else {h: d_model for h in hooks if acts.is_d_model_wide(h)}
    for c in cfgs:
        if c.hook_point_in in widths:
            check_k(c, c.expansion_factor * widths[c.hook_point_in])
    check_memory(cfgs, widths, device)
    return manifest


def open_data(cfg: Config, hooks: list[str], manifest: dict | None, rank: int, device: str):
    """The LM, or a cache of its activations, and the width of each hook point in the stream's
    columns, in order. From a cache the LM loads only where it evaluates during training: rank 0,
    with --eval-every (else at the end). Returns (model, drop_ids, widths)."""
    if manifest:
        model, drop_ids = load_lm(cfg, device) if cfg.eval_every and rank == 0 else (None, None)
        return model, drop_ids, acts.cache_columns(manifest)
    model, drop_ids = load_lm(cfg, device)
    return model, drop_ids, dict(zip(hooks, acts.hook_dims(model, hooks)))


def lm_chunks(cfg: Config, hooks: list[str], model, drop_ids, device: str, rank: int, world: int, start: dict):
    """Chunks of rows (each hook's activations side by side) from the LM, each with where the stream
    stands after it: the next context to read and the massive activations dropped so far."""
    outliers = start["outliers"]
    for a in train_activations(cfg, hooks, model, drop_ids, device, rank, world, start["next_context"]):
        outliers += a["outliers"]
        yield a["x"], {"next_context": a["last"] + 1, "outliers": outliers}


def activation_stream(cfg: Config, hooks: list[str], model, drop_ids, manifest, device: str, rank: int,
                      world: int, position: dict):
    """This rank's training batches from `position` on (a checkpoint's, or the start): yields
    (rows (B, the hooks' widths summed), the position after this batch), in --dtype. An SAE's x and
    y are two column ranges of the rows (the same one for an SAE: y = x, no copy); every SAE of a
    sweep reads the same rows. Rank r's buffer is seeded perm_seed + r."""
    start = {"next_context": position["next_context"], "outliers": position.get("outliers", 0)}
    if cfg.activations:                        # next_context counts the cache's chunks here
        chunks = ((rows.to(device), {"next_context": i + 1, "outliers": 0}) for i, rows in
                  acts.iter_cache(cfg.activations, manifest, cfg.perm_seed, rank, world, start["next_context"]))
    else:
        chunks = lm_chunks(cfg, hooks, model, drop_ids, device, rank, world, start)
    for rows, mixed in acts.mix(chunks, cfg.buffer_size, cfg.batch_size // world, cfg.perm_seed + rank,
                                cfg.generator_device or device, {**position["mix"], "source": start}):
        source = mixed.pop("source")
        yield rows.to(device, getattr(torch, cfg.dtype)), {**source, "mix": mixed}   # (a resumed buffer: CPU)


@dataclass
class Member:
    """One SAE of the run (a sweep trains several on one stream), and what it carries from step to
    step besides its weights and optimizer."""
    cfg: Config
    name: str                   # "" alone; in a sweep, its folder's name under the run folder
    folder: str                 # where its config.json, sae.safetensors, eval.json and log.jsonl go
    sae: SAE
    opt: torch.optim.Optimizer
    cols: tuple[slice, slice]   # its x and y among the stream's columns
    s_in: float = 1.0           # normalization: the SAE trains on x * s_in -> y * s_out
    s_out: float = 1.0
    since_fired: torch.Tensor | None = None     # (d_sae,) tokens since each latent last fired
    log_grad_norm: torch.Tensor | None = None   # the running mean of log ||gradient|| (clip_gradients_)
    window: acts.Stats | None = None            # the sums of the current log window
    first_loss: float | None = None             # its first window's loss: what divergence is judged by
    bad_windows: int = 0                        # log windows in a row past the divergence bounds


def member_folders(cfgs: list[Config]) -> list[str]:
    """The run folder for one SAE; in a sweep, one folder per SAE inside it."""
    if len(cfgs) == 1:
        return [cfgs[0].exp_result_path]
    return [os.path.join(cfgs[0].exp_result_path, name) for name in sweep_names(cfgs)]


def init_members(cfgs: list[Config], widths: dict[str, int], device: str, world: int, batches, ckpt: dict | None):
    """The SAEs and their optimizers: from the checkpoint, or fresh, with the normalization and the
    initialization made from the first batch, which is then trained on too. Each SAE is made as in
    a run of its own (its seed set just before), so a sweep's SAE is the one trained alone.
    Returns (members, step, batches)."""
    at = dict(zip(widths, itertools.accumulate(widths.values(), initial=0)))
    cols = lambda hook: slice(at[hook], at[hook] + widths[hook])
    if device == "cpu" and max(c.batch_size // world * c.expansion_factor * widths[c.hook_point_in] * 4
                               for c in cfgs) > 32 * 2 ** 20:        # large (B, m) tensors
        keep_freed_memory()
    first = None if ckpt else next(batches)
    members = []
    for i, (cfg, name, folder) in enumerate(zip(cfgs, sweep_names(cfgs), member_folders(cfgs))):
        d_in, d_out = widths[cfg.hook_point_in], widths[cfg.hook_out]
        check_k(cfg, cfg.expansion_factor * d_in)
        torch.manual_seed(cfg.seed)   # here: every rank starts from the same SAE, whatever loading the LM drew
        d_sae, n = cfg.expansion_factor * d_in, cfg.matryoshka_prefixes
        sae = SAE(d_in, d_sae, cfg.act_fn, cfg.top_k, d_out, cfg.hook_out != cfg.hook_point_in,
                  cfg.jumprelu_threshold_window, cfg.jumprelu_init_threshold,
                  matryoshka_sizes=[d_sae >> i for i in range(n - 1, -1, -1)] if n else None,
                  skip_connection=cfg.skip_connection, dtype=getattr(torch, cfg.dtype), device=device)
        opt = torch.optim.Adam(sae.param_groups(cfg.jumprelu_lr_factor), lr=cfg.learning_rate, betas=(0.9, 0.999), fused=True)
        m = Member(cfg, name, folder, sae, opt, (cols(cfg.hook_point_in), cols(cfg.hook_out)))
        if ckpt:
            saved = ckpt["saes"][i]
            sae.load_state_dict(saved["sae"])
            opt.load_state_dict(saved["opt"])
            m.s_in, m.s_out, m.since_fired = saved["s_in"], saved["s_out"], saved["since_fired"].to(device)
            if saved.get("log_grad_norm") is not None:
                m.log_grad_norm = saved["log_grad_norm"].to(device)
        else:
            init_from_batch_(m, first[0], world)
        members.append(m)
    if ckpt:
        torch.set_rng_state(ckpt["rng"])
        print0(f"resumed from step {ckpt['step']} ({cfgs[0].resume})")
        return members, ckpt["step"], batches
    return members, 0, itertools.chain([first], batches)


@torch.no_grad()
def init_from_batch_(m: Member, rows: torch.Tensor, world: int):
    """A fresh SAE's normalization, b_dec and decoder norm, from the first batch."""
    cfg, x0, y0 = m.cfg, rows[:, m.cols[0]].float(), rows[:, m.cols[1]].float()
    # One dataset-wide constant each for x and y so that mean ||x|| = sqrt(d). Averaged over ranks,
    # like the initial b_dec, so that every rank starts from the same SAE.
    s = torch.tensor([x0.shape[1] ** 0.5 / x0.norm(dim=1).mean(), y0.shape[1] ** 0.5 / y0.norm(dim=1).mean()],
                     device=rows.device) if cfg.normalize_activations else torch.ones(2, device=rows.device)
    m.s_in, m.s_out = rank_mean(s).tolist()
    m.sae.b_dec.copy_(rank_mean(y0.mean(0)) * m.s_out)         # initial b_dec = mean of the targets
    if cfg.grid_search_init_norm:
        # each rank's MSE at each r, averaged over ranks: the search sees the global batch and every
        # rank picks the same r (on its own batch alone, the ranks' r would differ)
        m.sae.train()
        r = m.sae.grid_search_init_norm_((x0 * m.s_in).to(m.sae.W_enc.dtype), y0 * m.s_out,
                                         k_at(0, cfg, cfg.total_training_tokens // cfg.batch_size), rank_mean)
        m.sae.threshold.fill_(-1.0)                            # forget the search's batches
        print0(f"grid search: decoder rows start at norm {r:.3f}" + (f" ({m.name})" if m.name else ""))
    m.since_fired = torch.zeros(m.sae.d_sae, dtype=torch.long, device=rows.device)


def start_run_folder(members: list[Member], resumed_step: int | None):
    """Rank 0: each SAE's train_config.json (its settings, as a run of its own would record them,
    and the code that ran them) and log.jsonl, which a new run starts anew and a resumed one cuts
    after its checkpoint (and a line cut short by a kill)."""
    for m in members:
        os.makedirs(m.folder, exist_ok=True)
        write_json({**run_config(m.cfg), "exp_result_path": m.folder, "code": code_version()},
                   os.path.join(m.folder, "train_config.json"))
        log_path = os.path.join(m.folder, "log.jsonl")
        if os.path.exists(log_path):
            with open(log_path) as f:
                keep = [l for l in f if resumed_step is not None and l.endswith("\n")
                        and json.loads(l)["step"] <= resumed_step]
            acts.write_atomic(log_path, "".join(keep))


def loss_terms(cfg: Config, sae: SAE, code, y, y_hat, step: int, total_steps: int, dead_M) -> dict:
    """The loss terms of one step, whose sum is the loss: the reconstruction error, and the sparsity
    penalty (and pre-activation loss) of relu / jumprelu, or AuxK of topk / batchtopk."""
    terms = {"mse": sae.reconstruction_loss(code, y, y_hat)}      # (Matryoshka: summed over the prefixes)
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


@torch.no_grad()
def clip_gradients_(m: Member, ratio: float):
    """Adaptive gradient clipping (as AutoClip, Seetharaman et al. 2020, with a running mean for the
    history): the gradient's norm is capped at `ratio` x the running geometric mean of the norms
    before it, which follows the clipped norms (a mean over some 10 steps). Why: a batch that holds
    one of the LM's massive activations (~100x the median norm) can give a gradient thousands of
    times the usual one. Unclipped, it inflates Adam's second moments of every parameter it reached,
    which then barely move for the rest of a run. TopK gives such a token k latents, and clipping
    costs it more than it saves; BatchTopK, ReLU and JumpReLU give it every latent past a threshold,
    hundreds. Every rank clips the same, all-reduced, gradient."""
    grads = [p.grad for p in m.sae.parameters() if p.grad is not None]
    log_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).log()
    if m.log_grad_norm is None:         # the first step: its own norm
        m.log_grad_norm = log_norm
    cap = m.log_grad_norm + math.log(ratio)
    scale = (cap - log_norm).clamp(max=0).exp()
    for g in grads:
        g.mul_(scale.to(g.dtype))
    m.log_grad_norm = 0.9 * m.log_grad_norm + 0.1 * torch.minimum(log_norm, cap)


def sync_state_(sae: SAE, fired_M: torch.Tensor, world: int):
    """State that is not a parameter, made identical on every rank explicitly: the firing counts
    that the dead-latent counters read, and BatchTopK's running threshold (each rank selects over
    its own local batch, so each has its own threshold)."""
    if world > 1:
        dist.all_reduce(fired_M)
        if sae.act_fn == "batchtopk":
            dist.all_reduce(sae.threshold)
            sae.threshold /= world


def train_step(m: Member, rows: torch.Tensor, step: int, total_steps: int, dead_tokens: int,
               autocast, world: int) -> tuple[torch.Tensor, int, float]:
    """One optimizer step of one SAE on its columns of the batch. Returns (loss, k, lr)."""
    cfg, sae = m.cfg, m.sae
    x, y = rows[:, m.cols[0]] * m.s_in, rows[:, m.cols[1]] * m.s_out
    k, lr = k_at(step, cfg, total_steps), lr_at(step, cfg, total_steps)
    for group in m.opt.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
    sae.train()
    with autocast:
        y_hat, code = sae(x, k)
        terms = loss_terms(cfg, sae, code, y, y_hat, step, total_steps, m.since_fired >= dead_tokens)
        loss = sum(terms.values())
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients_(sae, world)
    if cfg.clip_ratio:
        clip_gradients_(m, cfg.clip_ratio)
    m.opt.step()
    fired = code.fired(sae.d_sae)
    m.window.add(y.float(), y_hat.detach().float(), fired, {**terms, "loss": loss})
    sync_state_(sae, fired, world)
    m.since_fired += cfg.batch_size
    m.since_fired[fired > 0] = 0
    return loss, k, lr


def log_window(m: Member, step: int, k: int, lr: float, outliers: int, dead_tokens: int, seconds: float,
               bar, wandb_run, world: int):
    """The end of a log window (every rank: the sums are all-reduced): the status line, log.jsonl
    and W&B, then a new window. A loss grown 100x over the first window's, or an explained variance
    below -1, in three windows in a row, is a diverging run: stopped like a nan one, before its
    weights are checkpointed."""
    r = m.window.read(rank_sum, world)
    r.update(step=step, tokens=step * m.cfg.batch_size, k=k, lr=lr, outliers_dropped=outliers,
             dead=(m.since_fired >= dead_tokens).float().mean().item(), tokens_per_s=r["n"] / seconds)
    log(r, bar, wandb_run, m.folder, m.name)
    m.window = acts.Stats(m.sae.d_out, m.sae.d_sae, m.since_fired.device)
    # A batch that holds one of the LM's massive activations spikes a young run's loss and EV for a
    # step or two, and the run recovers; a diverging run stays there. So it takes three windows in a row.
    m.first_loss = m.first_loss or r["loss"]
    m.bad_windows = m.bad_windows + 1 if r["explained_variance"] < -1 or r["loss"] > 100 * m.first_loss else 0
    if m.bad_windows == 3:
        raise FloatingPointError(f"{m.name + ': ' if m.name else ''}the run diverges at step {step} (loss "
                                 f"{r['loss']:.3g}, at first {m.first_loss:.3g}; explained variance "
                                 f"{r['explained_variance']:.3g}): lower --lr (checkpoints written before "
                                 f"this step are kept)")


def write_checkpoint(cfg: Config, members: list[Member], step: int, position: dict, wandb_run, rank: int, world: int):
    """Every rank's data position, gathered to rank 0, which writes the checkpoint: one file holds
    every SAE of the run. The mixing buffer goes on the CPU, and only its rows: pickled, a view of
    a GPU tensor is all of its storage."""
    position = {**position, "mix": {k: v.cpu().clone() if k == "buf" else v for k, v in position["mix"].items()}}
    positions = [position]
    if world > 1:
        positions = [None] * world if rank == 0 else None
        dist.gather_object(position, positions, dst=0)
    if rank == 0:
        saes = [dict(sae=m.sae.state_dict(), opt=m.opt.state_dict(), s_in=m.s_in, s_out=m.s_out,
                     since_fired=m.since_fired.cpu(),
                     log_grad_norm=None if m.log_grad_norm is None else m.log_grad_norm.cpu()) for m in members]
        save_checkpoint(os.path.join(cfg.exp_result_path, "checkpoints"), dict(
            step=step, saes=saes, configs=[run_config(m.cfg) for m in members], rng=torch.get_rng_state(),
            data=positions, wandb_id=wandb_run.id if wandb_run else None), cfg.keep_checkpoints)


def evaluate_during_training(members: list[Member], step: int, model, drop_ids, wandb_run,
                             device: str, stop: threading.Event):
    """--eval-every (rank 0). A signal stops it at once and the loop checkpoints: a scheduler's
    kill follows its SIGTERM (torchrun's and Slurm's some 30 s later)."""
    try:
        with caught_signals():
            if stop.is_set():       # a signal that came just before this handler took over
                raise KeyboardInterrupt
            results = evaluate_members(members, [[folded(m.sae, m.s_in, m.s_out)] for m in members],
                                       model, drop_ids, device)
        for m, (result,) in zip(members, results):
            print_eval(result, f"held-out evaluation at step {step}" + (f" ({m.name})" if m.name else ""))
            wandb_log(wandb_run, m.name + "/eval" if m.name else "eval", result, step)
    except KeyboardInterrupt:
        stop.set()
        print0(f"held-out evaluation at step {step} stopped by a signal")


def train_loop(cfg: Config, members: list[Member], step: int, batches, model, drop_ids, wandb_run,
               rank: int, world: int, device: str) -> int:
    """Train every SAE on each batch until the last step, or a signal (SIGTERM, SIGINT: the step
    ends, a checkpoint is written). Checkpoints every checkpoint_every steps and every
    checkpoint_minutes. Returns the step reached."""
    total_steps = cfg.total_training_tokens // cfg.batch_size
    dead_tokens = min(cfg.dead_tokens, cfg.total_training_tokens // 10)
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, cfg.amp_dtype),
                              enabled=cfg.amp_dtype != "float32")
    for m in members:
        m.window = acts.Stats(m.sae.d_out, m.sae.d_sae, device)
    stop, fetching, position = threading.Event(), threading.Event(), None
    resume = f"checkpoint written, resume with --resume {cfg.exp_result_path}"
    t0 = saved_at = time.time()
    with progress_bar(total_steps * cfg.batch_size, step * cfg.batch_size, rank) as bar, caught_signals(stop, fetching):
        while step < total_steps:
            try:
                if world == 1:      # a signal abandons a refill of the buffer (seconds of LM forwards);
                    fetching.set()  # (under torchrun the other ranks would wait in a collective)
                got = next(batches)
                fetching.clear()    # (a signal before this line drops the batch just fetched)
                rows, position = got
            except KeyboardInterrupt:   # the checkpoint: the steps done, at the last batch's position
                if position is not None:
                    write_checkpoint(cfg, members, step, position, wandb_run, rank, world)
                print0(f"stopped by a signal at step {step}; {resume if position is not None else 'no step was done'}")
                break
            except ValueError as e:  # bad data (a broken line deep in a .jsonl): keep the steps done
                if world > 1 or position is None:   # (under torchrun the other ranks wait in a collective)
                    raise
                write_checkpoint(cfg, members, step, position, wandb_run, rank, world)
                raise ValueError(f"{e} (checkpoint written at step {step}: fix the data, then "
                                 f"--resume {cfg.exp_result_path})") from None
            stepped = [train_step(m, rows, step, total_steps, dead_tokens, autocast, world) for m in members]
            step += 1
            bar.update(cfg.batch_size)

            if step % cfg.log_frequency == 0 or step == total_steps:
                outliers = int(rank_sum(torch.tensor(float(position["outliers"]), device=device)))
                for m, (_, k, lr) in zip(members, stepped):
                    log_window(m, step, k, lr, outliers, dead_tokens, time.time() - t0, bar, wandb_run, world)
                t0 = time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and rank == 0 and not stop.is_set():
                evaluate_during_training(members, step, model, drop_ids, wandb_run, device, stop)

            due = cfg.checkpoint_minutes and time.time() - saved_at > 60 * cfg.checkpoint_minutes
            losses = torch.stack([loss.detach().float() for loss, _, _ in stepped])
            flags = torch.tensor([float(stop.is_set()), float(due), float(not losses.isfinite().all())], device=device)
            if world > 1:
                dist.all_reduce(flags)          # any rank's signal, clock or nan: every rank agrees
            stop_now, due, diverged = flags.tolist()
            if diverged:                        # no checkpoint of nan weights: the last one stays
                name = next((m.name for m, l in zip(members, losses) if not l.isfinite()), "")
                raise FloatingPointError(f"{name + ': ' if name else ''}the loss is nan or inf at step {step}: "
                                         f"lower --lr" + (" or use --amp-dtype bfloat16 (float16 overflows)"
                                         if cfg.amp_dtype == "float16" else "") +
                                         " (checkpoints written before this step are kept)")
            if stop_now or due or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                saved_at = time.time()
                write_checkpoint(cfg, members, step, position, wandb_run, rank, world)
                if stop_now:
                    print0(f"stopped by a signal at step {step}; {resume}")
                    break
    return step


def check_ranks_agree(members: list[Member], rank: int, world: int):
    """Every rank must hold the same SAEs at the end: checked, not assumed."""
    if world > 1:
        flat = torch.cat([p.detach().flatten() for m in members for p in m.sae.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref, flat), f"rank {rank} ended with weights that differ from rank 0's"


def save_and_evaluate(cfg: Config, members: list[Member], step: int, model, drop_ids, wandb_run,
                      device: str) -> dict:
    """Rank 0: save each SAE with the normalization folded in (a BatchTopK one also converted to
    JumpReLU, in jumprelu/ beside it), then evaluate them on held-out text and write each eval.json;
    a sweep also writes its summary. Returns the results (a sweep's: by SAE name)."""
    # A signal from the first save on (Ctrl-C, or a scheduler's SIGTERM, which would kill silently)
    # lets the save that is under way end, then stops the run with word that its SAEs are saved.
    code, stop, saved = code_version(), threading.Event(), threading.Event()
    try:
        with caught_signals(stop, abandon=saved):
            saes = [save_member(m, code) for m in members]
            saved.set()
            if stop.is_set():       # a signal that came while saving
                raise KeyboardInterrupt
            if model is None:   # trained from a cache: the LM is needed only now, once the SAEs are saved
                model, drop_ids = load_lm(cfg, device)
            results = evaluate_members(members, saes, model, drop_ids, device)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"before the evaluation ended; the SAE is saved: evaluate it with "
                                f"--eval-only {members[0].folder}") from None
    out = {}
    for m, (result, *converted) in zip(members, results):
        print_eval(result, f"held-out evaluation ({m.folder})", m.folder)
        if converted:
            result["jumprelu"] = converted[0]
            print_eval(result["jumprelu"], f"converted to JumpReLU ({m.folder}/jumprelu)", os.path.join(m.folder, "jumprelu"))
        wandb_log(wandb_run, m.name + "/eval" if m.name else "eval", result, step)
        out[m.name] = result
    if len(members) > 1:
        write_sweep_summary(cfg.exp_result_path, members, out)
    if wandb_run:
        wandb_run.finish()
    return out if len(members) > 1 else out[""]


def save_member(m: Member, code: dict) -> list[SAE]:
    """One SAE saved with the normalization folded in (a BatchTopK one also converted to JumpReLU,
    in jumprelu/ beside it). Returns the raw-space SAEs saved, for the evaluation."""
    extra = {"train": {**run_config(m.cfg), "exp_result_path": m.folder}, "code": code,
             "norm_scale_in": m.s_in, "norm_scale_out": m.s_out}
    saes = [folded(m.sae, m.s_in, m.s_out)]
    saes[0].save(m.folder, extra)
    converted = os.path.join(m.folder, "jumprelu")
    if m.cfg.act_fn == "batchtopk":
        saes.append(folded(m.sae, m.s_in, m.s_out).to_jumprelu_())
        saes[1].save(converted, extra)
    elif os.path.exists(os.path.join(converted, "sae.safetensors")):   # an earlier run's, in this folder
        shutil.rmtree(converted)
    return saes


SUMMARY = ("explained_variance", "explained_variance_typical", "l0", "dead", "ultra_rare",
           "ce_loss_recovered", "delta_lm_loss", "kl_clean_sae")


def write_sweep_summary(folder: str, members: list[Member], results: dict):
    """sweep.json and sweep.csv, one row per SAE (its settings, its held-out metrics), and
    frontier.png: L0 against explained variance and against CE loss recovered, a line per
    setting other than k (or the sparsity coefficient), a row of panels per pair of hook points."""
    import csv
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [{"name": m.name, **{k: getattr(m.cfg, k) for k in SWEPT}, "hook_point_out": m.cfg.hook_out,
             **{k: results[m.name][k] for k in SUMMARY}} for m in members]
    write_json({"saes": rows}, os.path.join(folder, "sweep.json"))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    acts.write_atomic(os.path.join(folder, "sweep.csv"), text.getvalue())

    hooks = list(dict.fromkeys((r["hook_point_in"], r["hook_point_out"]) for r in rows))
    along = ("top_k", "sparsity_coefficient", "hook_point_in", "hook_point_out")    # along a line
    varying = [k for k in SWEPT if k not in along and len({r[k] for r in rows}) > 1]
    fig, axes = plt.subplots(len(hooks), 2, figsize=(11, 4.2 * len(hooks)), squeeze=False)
    for panels, (h_in, h_out) in zip(axes, hooks):
        here = [r for r in rows if (r["hook_point_in"], r["hook_point_out"]) == (h_in, h_out)]
        for ax, metric, label in zip(panels, ("explained_variance", "ce_loss_recovered"),
                                     ("explained variance (held out)", "CE loss recovered (held out)")):
            for line in dict.fromkeys(tuple(r[k] for k in varying) for r in here):
                pts = sorted((r["l0"], r[metric]) for r in here if tuple(r[k] for k in varying) == line)
                ax.plot(*zip(*pts), marker="o", label=" ".join(f"{k}={v}" if k != "act_fn" else v
                                                             for k, v in zip(varying, line)) or None)
            ax.set_xscale("log")
            ax.set(xlabel="L0 (latents active per token)", ylabel=label,
                   title=h_in if h_in == h_out else f"{h_in} -> {h_out}")
            ax.grid(alpha=0.3, which="both")
            if varying:
                ax.legend()
    fig.tight_layout()
    acts.write_atomic(os.path.join(folder, "frontier.png"), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(cfgs: Config | list[Config]) -> dict:
    """One training run: one SAE, or a sweep of several (one Config each, differing only in SWEPT)
    trained on one activation stream. Returns the held-out evaluation's results (a sweep's by SAE
    name; {"stopped_at": step} after a signal)."""
    cfgs = [cfgs] if isinstance(cfgs, Config) else cfgs
    rank, world, device = setup_processes(cfgs[0])
    cfgs = resolve_dtypes(cfgs, device)
    cfg, hooks = cfgs[0], stream_hooks(cfgs)       # cfg: the settings the SAEs share
    manifest = check_data(cfgs, device)
    ckpt = check_run_folder(cfgs, rank, world)
    wandb_run = start_wandb(cfgs, ckpt) if rank == 0 and (cfg.wandb_project or cfg.exp_name) else None
    model, drop_ids, widths = open_data(cfg, hooks, manifest, rank, device)
    position = ckpt["data"][rank] if ckpt else {"next_context": 0, "outliers": 0, "mix": {}}
    batches = activation_stream(cfg, hooks, model, drop_ids, manifest, device, rank, world, position)
    members, step, batches = init_members(cfgs, widths, device, world, batches, ckpt)
    if rank == 0:
        start_run_folder(members, step if ckpt else None)
    step = train_loop(cfg, members, step, batches, model, drop_ids, wandb_run, rank, world, device)
    if step < cfg.total_training_tokens // cfg.batch_size:      # stopped by a signal, checkpointed
        end_processes(world)
        return {"stopped_at": step}
    check_ranks_agree(members, rank, world)
    result = save_and_evaluate(cfg, members, step, model, drop_ids, wandb_run, device) if rank == 0 else {}
    end_processes(world)
    return result


# -------------------------------------------------------------------------------------------------
# the other two commands: write an activation cache, evaluate a saved SAE


def cache_main(cfgs: Config | list[Config]) -> dict:
    """--cache-activations DIR: write total_training_tokens of the activation stream (held-out
    contexts excluded) to DIR, so that runs with --activations DIR skip the LM entirely. Several
    hook points (a sweep's) are cached side by side, from one LM forward."""
    cfgs = [cfgs] if isinstance(cfgs, Config) else cfgs
    cfg, hooks = cfgs[0], stream_hooks(cfgs)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--cache-activations runs in one process (the LM forward is the cost); "
                         "train from the cache under torchrun")
    if os.path.exists(os.path.join(cfg.cache_activations, "manifest.json")):       # before the LM loads
        raise ValueError(f"{cfg.cache_activations} already holds a complete cache; train from it "
                         f"with --activations {cfg.cache_activations}")
    check_sweep(cfgs)
    device = default_device(cfg)
    cfg = resolve_dtypes([cfg], device)[0]
    check_model_and_data(cfg, hooks=hooks)
    model, drop_ids = load_lm(cfg, device)
    manifest = {**{k: getattr(cfg, k) for k in CACHE_KEYS}, "hooks": hooks, "widths": acts.hook_dims(model, hooks)}
    with progress_bar(cfg.total_training_tokens, 0, 0) as bar:
        stream = train_activations(cfg, hooks, model, drop_ids, device, passes=1)
        manifest = acts.write_cache(cfg.cache_activations, (bar.update(len(a["x"])) or a for a in stream),
                                    manifest, cfg.total_training_tokens)
    print0(f"cached {manifest['tokens']:,} tokens of {', '.join(hooks)} in {len(manifest['shards'])} "
           f"shards at {cfg.cache_activations}; train with --activations {cfg.cache_activations}")
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
    cfg = resolve_dtypes([cfg], device)[0]
    check_model_and_data(cfg, training=False)          # before the LM loads: its hooks, the held-out text
    model, drop_ids = load_lm(cfg, device)
    if [sae.d_in, sae.d_out] != acts.hook_dims(model, [cfg.hook_point_in, cfg.hook_out]):
        raise ValueError(f"{folder}: the SAE maps {sae.d_in} -> {sae.d_out}, {cfg.model}'s "
                         f"{cfg.hook_point_in} -> {cfg.hook_out} is not that; give --model and --hook-point-in")
    result = evaluate(sae.to(device), model, cfg, drop_ids, device)
    print_eval(result, f"held-out evaluation ({folder})", folder)
    return result


if __name__ == "__main__":
    try:
        cfgs = parse_args(sys.argv[1:])
        if cfgs[0].eval_only and len(cfgs) > 1:
            raise ValueError("--eval-only evaluates one saved SAE: give each setting once")
        if cfgs[0].eval_only:
            eval_only(cfgs[0])
        elif cfgs[0].cache_activations:
            cache_main(cfgs)
        else:
            main(cfgs)
    except (ValueError, FileNotFoundError, FloatingPointError, acts.WriteError, SaveError) as e:   # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:     # before or after the training loop, which checkpoints first
        print(f"error: interrupted {e}".rstrip(), file=sys.stderr)
        sys.exit(130)
