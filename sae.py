"""The sparse autoencoder: activation functions, losses, init, BatchTopK -> JumpReLU, save/load.

Notation (see README): x (B, d_in) the input activation, y (B, d_out) the target (y = x for an SAE,
another hook point for a transcoder), m = d_sae latents. Weights are stored as nn.Linear stores
them: W_enc (m, d_in), W_dec (m, d_out).

    h = (x - b_dec) W_enc^T + b_enc        (no b_dec subtraction for a transcoder)
    c_i = h_i * n_i,  n_i = ||W_dec[i]||   the size of what latent i adds to the reconstruction
    f_i = act(c_i) / n_i
    y_hat = f W_dec + b_dec                (+ x W_skip^T for a skip transcoder)

Decoder rows are not forced to unit norm: TopK ranks, and JumpReLU thresholds, the contribution c
(as in Anthropic's "Towards Monosemanticity", where the L1 penalty is weighted by ||W_dec[i]||).

The file has two halves. Above the fence, the SAE as these formulas state it, each activation
function one short branch of SAE.encode. Below it, the fast paths (the same code, losses and gradients
with far less work), then files: save, load, export to SAELens and circuit-tracer. Imports torch, safetensors.
"""
import ctypes
import hashlib
import inspect
import json
import math
import os
import platform
from functools import partial
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]
TANH_C = 4.0        # the tanh penalty's c (README)


class Code(NamedTuple):
    """The code of a batch of B tokens. Dense: f_BM (B, m), the latent activations f. Sparse (only
    the fast paths make one): f_BM is None, and token rows[j] uses latent cols[j] with value
    vals[j], rows sorted."""
    f_BM: torch.Tensor | None
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    vals: torch.Tensor | None
    pre_BM: torch.Tensor        # (B, m) the contributions c; h where pre_is_c is False (c = h n)
    n_M: torch.Tensor           # (m,) decoder row norms n_i = ||W_dec[i]||
    pre_is_c: bool = True
    fast: "Fast | None" = None  # what a fast path hands on to decode and the losses (see Fast)

    @property
    def c_BM(self) -> torch.Tensor:
        """(B, m) the contributions c = h * n that the activation functions rank and threshold."""
        return self.pre_BM if self.pre_is_c else self.pre_BM * self.n_M.to(self.pre_BM.dtype)

    def dense(self) -> torch.Tensor:
        """(B, m) latent activations f, zero where a latent is off, whichever path made the code."""
        if self.f_BM is not None:
            return self.f_BM
        f_BM = torch.zeros(self.pre_BM.shape, dtype=self.vals.dtype, device=self.vals.device)
        return f_BM.index_put((self.rows, self.cols), self.vals)

    def active(self) -> torch.Tensor:
        """(B, m) 1.0 where a latent fired (f is never negative), as floats: bools sum slower."""
        f_BM = self.dense()
        return torch.gt(f_BM, 0, out=torch.empty(f_BM.shape, device=f_BM.device))

    def nnz_per_token(self) -> torch.Tensor:
        """(B,) number of active latents of each token, as floats whichever path made the code."""
        if self.f_BM is not None:
            return self.active().sum(-1)
        return torch.bincount(self.rows[self.vals != 0], minlength=len(self.pre_BM)).float()

    def fired(self, M: int) -> torch.Tensor:
        """(M,) how many tokens of the batch each latent fired on, as floats whichever path made the
        code: under torchrun the ranks sum it, and a rank's path depends on its own batch."""
        if self.f_BM is not None:
            return self.active().sum(0)
        return torch.bincount(self.cols[self.vals != 0], minlength=M).float()


class PlainJumpReLU(torch.autograd.Function):
    """f = c H(c - theta), per latent, with the straight-through estimator of Rajamanoharan et al.
    2024 ("Jumping Ahead"): the step H passes no gradient to c, and a rectangle window of width eps
    gives theta one, dL/dtheta_i = sum_batch dL/df (-theta_i / eps) 1[|c - theta_i| < eps/2, c > 0]."""

    @staticmethod
    def forward(ctx, c, theta, eps):
        ctx.save_for_backward(c, theta)
        ctx.eps = eps
        return c * (c > theta)

    @staticmethod
    def backward(ctx, g):
        c, theta = ctx.saved_tensors
        window = ((c - theta).abs() < ctx.eps / 2) & (c > 0)
        return g * (c > theta), (g * window).sum(0) * (-theta / ctx.eps), None


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, act_fn: ActFn = "topk", top_k: int = 64,
                 d_out: int | None = None, transcoder: bool = False,
                 jumprelu_threshold_window: float = 0.1, jumprelu_init_threshold: float = 0.1,
                 matryoshka_sizes: list[int] | None = None, skip_connection: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """matryoshka_sizes: nested prefixes of the latents, the last d_sae (see reconstruction_loss).
        skip_connection: a transcoder's y_hat gets a linear map of x added, x W_skip^T (forward)."""
        super().__init__()
        if act_fn not in get_args(ActFn):
            raise ValueError(f"unknown act_fn {act_fn!r}: use relu, jumprelu, topk or batchtopk")
        d_out = d_out or d_in
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.act_fn, self.top_k, self.transcoder = act_fn, top_k, transcoder
        self.matryoshka_sizes = checked_prefixes(matryoshka_sizes, act_fn, d_sae)
        if skip_connection and not transcoder:
            raise ValueError("skip_connection is for a transcoder: an SAE's would learn the identity map")
        self.skip_connection = skip_connection
        self.jumprelu_threshold_window = jumprelu_threshold_window
        self.jumprelu_init_threshold = jumprelu_init_threshold
        kw = dict(dtype=dtype, device=device)
        # Random decoder directions; an SAE's encoder starts as its decoder (h = x W_dec^T). A transcoder
        # reads another space than it writes, even at one width: its encoder is drawn on its own.
        W_dec = torch.randn(d_sae, d_out, **kw)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                                          # (m, d_out)
        self.W_enc = nn.Parameter(torch.randn(d_sae, d_in, **kw) / d_in ** 0.5    # (m, d_in)
                                  if transcoder or d_in != d_out else W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        # JumpReLU thresholds live in fp32 whatever the SAE's dtype: exp() of a bf16 log is coarse.
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(jumprelu_init_threshold),
                                                     dtype=torch.float32, device=device))
        # BatchTopK's running threshold: the smallest contribution it kept, averaged over batches.
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        if skip_connection:         # (d_out, d_in) as nn.Linear stores it; at zero the plain transcoder
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw))

    def config(self) -> dict:
        """The constructor arguments that rebuild this SAE (saved as config.json)."""
        names = inspect.signature(SAE.__init__).parameters
        return {k: getattr(self, k) for k in names if k not in ("self", "dtype", "device")}

    def param_groups(self, threshold_lr_factor: float) -> list[dict]:
        """For torch.optim: the weights and biases at the learning rate, JumpReLU's log thresholds
        at threshold_lr_factor times it (the loop sets group["lr"] = lr * group.get("lr_factor", 1))."""
        skip = [self.W_skip] if self.skip_connection else []
        return [{"params": [self.W_enc, self.W_dec, self.b_enc, self.b_dec] + skip},
                {"params": [self.log_threshold], "lr_factor": threshold_lr_factor}]

    # ---------------------------------------------------------------------------------------
    # forward

    def encode(self, x_BD: torch.Tensor, k: int | None = None) -> Code:
        """The Code of x (B, d_in); k (topk, batchtopk) defaults to top_k."""
        k = self.top_k if k is None else k
        if self.act_fn in ("topk", "batchtopk") and not 1 <= k <= self.d_sae:
            raise ValueError(f"k = {k}: {self.act_fn} takes 1 <= k <= d_sae = {self.d_sae}")
        if FAST and (code := fast_encode(self, x_BD, k)) is not None:
            return code
        h_BM = (x_BD if self.transcoder else x_BD - self.b_dec) @ self.W_enc.T + self.b_enc
        n_M = self.W_dec.norm(dim=1)
        c_BM = h_BM * n_M                           # the contributions, which act() works on
        if self.act_fn == "relu":
            a_BM = F.relu(c_BM)
        elif self.act_fn == "jumprelu":
            a_BM = PlainJumpReLU.apply(c_BM, self.log_threshold.exp(), self.jumprelu_threshold_window)
        elif self.act_fn == "topk":                  # each token's k largest
            c_Bk, idx_Bk = c_BM.topk(k, dim=-1, sorted=False)
            a_BM = torch.zeros_like(c_BM).scatter(1, idx_Bk, F.relu(c_Bk))
        elif self.act_fn == "batchtopk":             # the batch's k*B largest (Bussmann et al. 2024)
            c, at = c_BM.flatten().topk(k * len(c_BM), sorted=False)
            a_BM = torch.zeros_like(c_BM).flatten().scatter(0, at, F.relu(c)).view_as(c_BM)
            if self.training:
                self.update_threshold_(torch.where(c > 0, c.detach(), torch.inf).min())
        return Code(a_BM / n_M, None, None, None, c_BM, n_M)   # f = act(c) / n

    def decode(self, code: Code | torch.Tensor) -> torch.Tensor:
        """y_hat from a Code (encode's), or from latent activations f (..., d_sae): edited ones, say.
        (A skip transcoder's x W_skip^T is not in it: forward adds it.)"""
        if isinstance(code, torch.Tensor):
            return code.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if code.f_BM is None:                  # a fast path's sparse code: k rows of W_dec per token
            return sparse_decode(self, code) + self.b_dec
        return code.f_BM @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, Code]:
        """y_hat, shaped as x (..., d_in) but with d_out, and the Code of its tokens (tokens, d_sae).
        x is cast to the SAE's dtype; k (topk, batchtopk) defaults to top_k."""
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(f"x is {tuple(x.shape)}: the SAE takes (..., d_in = {self.d_in}) activations")
        x_BD = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        code = self.encode(x_BD, k)
        y_hat = self.decode(code)
        if self.skip_connection:   # a skip transcoder (Paulo et al. 2025): y_hat + x W_skip^T
            y_hat = y_hat + x_BD @ self.W_skip.T
        return y_hat.view(*x.shape[:-1], self.d_out), code

    @torch.no_grad()
    def update_threshold_(self, t: torch.Tensor, decay: float = 0.95):
        """Exponential moving average of BatchTopK's smallest kept contribution. A memory of ~20
        steps follows the SAE as it trains, so the conversion uses the end-of-training value."""
        t, old = t.float(), self.threshold
        # No Python branch on a tensor, which would wait for the device every step. t is inf when
        # nothing fired: the average stays.
        new = torch.where(old < 0, t, decay * old + (1 - decay) * t)
        self.threshold.copy_(torch.where(t.isfinite(), new, old))

    # ---------------------------------------------------------------------------------------
    # losses

    def reconstruction_loss(self, code: Code, y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of ||y_hat - y||^2. With matryoshka_sizes m_1 < ... < m (Bussmann et al.
        2025, "Learning Multi-Level Features with Matryoshka SAEs"), the sum over the prefixes of the
        error of the reconstruction from the latents of the prefix alone (the code's one selection,
        latents past m_j zeroed): y_hat less the latents past m_j, the last ones first."""
        y, y_hat = y.reshape(-1, self.d_out).float(), y_hat.reshape(-1, self.d_out).float()
        loss, m = (y_hat - y).pow(2).sum(-1).mean(), self.matryoshka_sizes or []
        for lo, hi in reversed(list(zip(m, m[1:]))):
            y_hat = y_hat - (code.f_BM[:, lo:hi] @ self.W_dec[lo:hi] if code.f_BM is not None
                             else sparse_decode(self, code, lo, hi)).float()      # (sparse: their pairs)
            loss = loss + (y_hat - y).pow(2).sum(-1).mean()
        return loss

    def sparsity_loss(self, code: Code, kind: Literal["l1", "tanh"], c: float = TANH_C):
        """Per-token penalty on the contributions f_i * n_i: l1 = sum_i f_i n_i,
        tanh = sum_i tanh(c f_i n_i) (a smooth L0 proxy, Anthropic's April 2024 update)."""
        B = len(code.pre_BM)
        if code.f_BM is None:                            # sparse code: the nonzero pairs only
            a = code.vals * code.n_M[code.cols].to(code.vals.dtype)
            return (a if kind == "l1" else torch.tanh(c * a)).sum() / B
        if kind == "tanh" and c == TANH_C and code.fast is not None and code.fast.tanh_sum is not None:
            return code.fast.tanh_sum / B                # made along with f (the blocked JumpReLU)
        n_M = code.n_M.to(code.f_BM.dtype)
        if kind == "l1":
            return (code.f_BM @ n_M).mean()              # a matvec: one read of f
        return torch.tanh(code.f_BM * (c * n_M)).sum() / B

    def pre_act_loss(self, code: Code):
        """JumpReLU's pre-activation loss sum_i ReLU(theta_i - h_i) n_i: it pulls latents that sit
        below their threshold up toward it. Written in contribution space, ReLU(theta_i - c_i),
        which is the same quantity with the threshold on h being theta_i / n_i."""
        return F.relu(self.log_threshold.exp() - code.c_BM).sum(-1).mean()

    def auxk_loss(self, code: Code, resid_BD: torch.Tensor, dead_M: torch.Tensor,
                  k_aux: int = 512) -> torch.Tensor:
        """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): each token's top
        k_aux dead latents reconstruct the residual e = y - y_hat (detached), mean ||e - e_hat||^2.
        Only dead latents' encoder and decoder rows get a gradient."""
        if (n_dead := int(dead_M.sum())) == 0:
            return resid_BD.new_zeros(())
        k_aux = min(k_aux, n_dead)
        if code.fast is not None:
            return fast_auxk_loss(self, code, resid_BD, dead_M, k_aux)
        c_BM = code.c_BM
        idx_Bk = c_BM.detach().masked_fill(~dead_M, -torch.inf).topk(k_aux, dim=-1, sorted=False).indices
        f_BM = torch.zeros_like(c_BM).scatter(1, idx_Bk, F.relu(c_BM.gather(1, idx_Bk)) / code.n_M[idx_Bk])
        return (resid_BD.detach() - f_BM @ self.W_dec).pow(2).sum(-1).mean()

    # ---------------------------------------------------------------------------------------
    # init, conversion, folding

    @torch.no_grad()
    def set_decoder_norm_(self, r: float):
        """Every decoder row to norm r and an SAE's encoder to the decoder again (W_enc = W_dec)."""
        self.W_dec.mul_(r / self.W_dec.norm(dim=1, keepdim=True))
        if not self.transcoder and self.d_in == self.d_out:
            self.W_enc.copy_(self.W_dec)

    @torch.no_grad()
    def grid_search_init_norm_(self, x_BD: torch.Tensor, y_BD: torch.Tensor, k: int | None = None,
                               mean=lambda t: t) -> float:
        """Pick the decoder-row norm r with the lowest reconstruction MSE on one batch (at the k of
        the first step): a coarse search over linspace(0.1, 5.0, 50), then a fine one around the best
        coarse value. mean() turns this batch's MSE into the global batch's (train.py: over ranks)."""
        def mse(r):
            self.set_decoder_norm_(r)
            return mean((self(x_BD, k)[0] - y_BD).pow(2).sum(-1).mean()).item()
        coarse = min(torch.linspace(0.1, 5.0, 50).tolist(), key=mse)
        best = min(torch.linspace(coarse - 0.09, coarse + 0.1, 20).tolist(), key=mse)
        self.set_decoder_norm_(best)
        return best

    @torch.no_grad()
    def to_jumprelu_(self) -> "SAE":
        """BatchTopK -> JumpReLU: every latent's threshold becomes the running batch threshold t,
        so a token's code no longer depends on its batch-mates."""
        assert self.act_fn == "batchtopk", "only a BatchTopK SAE converts to JumpReLU"
        assert self.threshold > 0, "this SAE has no running threshold (was it trained?)"
        self.log_threshold.fill_(math.log(self.threshold.item()))
        self.act_fn, self.matryoshka_sizes = "jumprelu", None     # the prefixes were a training loss
        return self

    @torch.no_grad()
    def fold_scales_(self, s_in: float, s_out: float):
        """Trained on x * s_in -> y * s_out; make it take raw x and give raw y. Contributions and
        thresholds scale by 1 / s_out; the code f and so L0 stay the same."""
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        self.log_threshold.sub_(math.log(s_out))
        if self.threshold > 0:
            self.threshold.div_(s_out)
        if self.skip_connection:            # (x s_in) W_skip^T / s_out
            self.W_skip.mul_(s_in / s_out)

    # ---------------------------------------------------------------------------------------
    # save / load: config.json + sae.safetensors in one folder

    def save(self, folder: str, extra: dict | None = None):
        """config.json (extra, the constructor arguments, the weights' sha256) + sae.safetensors in
        one folder, each file written whole or not at all (save_sae, at the end of the file)."""
        save_sae(self, folder, extra)

    @staticmethod
    def load(folder: str, device: str | torch.device = "cpu") -> "SAE":
        """A saved SAE, in eval mode (load_sae: the checks that config and weights are one SAE's)."""
        return load_sae(folder, device)


# =================================================================================================
# FAST PATHS
#
# Everything below computes what the plain SAE above computes (the same code, the same losses and
# gradients, up to rounding) with less work, and is reached from it through one call each: encode
# (fast_encode), decode of a sparse code (sparse_decode), AuxK (fast_auxk_loss). What it does:
#   - relu and jumprelu work on h with per-latent bounds, never building c = h * n; on CPU the dense
#     JumpReLU runs forward and backward a block of rows at a time (JumpReLU).
#   - Once few latents fire, the code is sparse: (rows, cols, vals) pairs, decoded with an
#     embedding_bag (k rows of W_dec per token instead of m), with a backward that touches only
#     the latents that fired (SparseEncode, SparseDecode).
#   - topk and batchtopk select without autograd, skipping most values (row_topk, largest_pairs),
#     and on a CPU with bf16 matrix units select on a bf16 estimate of c with an error bound,
#     checked on the exact c (estimate_c, exact_pairs).
# Which path a batch takes depends on the device, the matmul dtype and how many latents fire
# (SPARSE_BELOW, ESTIMATE_FROM). FAST = False runs every act_fn on the plain path: to check a
# change against it, or to try a new idea in the plain code first. The tests hold the two paths
# to the same outputs and gradients.
# =================================================================================================

FAST = True


# relu / jumprelu take the sparse code when at most this share of (token, latent) pairs fire (a
# window pair below JumpReLU's threshold counts half); topk / batchtopk wherever there is an entry.
# Each is about where the sparse step overtakes the dense one. A GPU runs dense matmuls so fast
# that sparse wins there only in fp32 and only at a low L0; under bf16 on a GPU it does not win
# at all, so that has no entry (dense throughout).
SPARSE_BELOW = {("cpu", torch.float32): 0.07, ("cpu", torch.bfloat16): 0.03, ("cpu", torch.float16): 0.04,
                ("cuda", torch.float32): 0.005}

# fp32 topk and batchtopk on a CPU whose low-precision matmuls run several times faster than fp32
# ones select on estimate_c's estimate of c, then exact_pairs, where m >= ESTIMATE_FROM: from a bf16
# matmul with bf16 matrix units (AMX), else from an int8 one with int8 dot-product instructions
# (VNNI: Intel CPUs since Cascade Lake, AMD's since Zen 4, with or without native bf16). int8's
# error is some times bf16's, so it leaves more pairs to check exactly. The gain grows with m;
# below ESTIMATE_FROM the exact checks cost about what the estimate saves.
AMX, VNNI = (getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_vnni_supported"))
ESTIMATE = "int8" if VNNI and not AMX else "bf16"
ESTIMATE_FROM = 12288 if AMX or VNNI else math.inf

BLOCK = 2 ** 18     # elements of a row block of a (B, m) tensor on CPU: 1 MB in fp32 (see JumpReLU)


class Fast(NamedTuple):
    """What a fast encode hands on, in its Code, to decode and AuxK."""
    x_BD: torch.Tensor                  # the centred input x - b_dec (x for a transcoder), no autograd
    h_BM: torch.Tensor | None = None    # dense paths: h with autograd, where AuxK takes its pairs
    bags: tuple | None = None           # sparse code: latent_bags of its pairs that fired
    estimated: bool = False             # pre_BM is estimate_c's bf16 estimate of c
    tanh_sum: torch.Tensor | None = None  # dense jumprelu: sum tanh(TANH_C f n), made with f


def keep_freed_memory():
    """glibc gives every freed block over 32 MB back to the OS, so on CPU each (B, m) tensor of a
    large batch faults its pages in anew, which takes about as long as the op that fills it. Keep
    freed blocks in the heap for the next step instead, as a caching allocator would: it pays most
    where a step makes many large (B, m) tensors (a dense jumprelu, large m). The cost: memory is
    not given back, and the heap's fragmentation can about double the resident memory."""
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)                 # M_MMAP_MAX: no block gets a mapping of its own
        libc.mallopt(-1, -1)                # M_TRIM_THRESHOLD -1: the heap never shrinks


def fast_encode(sae: SAE, x_BD: torch.Tensor, k: int) -> Code | None:
    """SAE.encode's fast paths; None for an act_fn that has none (it then takes the plain path)."""
    if sae.act_fn not in ("relu", "jumprelu", "topk", "batchtopk"):
        return None
    n_M = sae.W_dec.norm(dim=1)
    # h = (x - b_dec) W_enc^T + b_enc with x centred on a detached b_dec, and b_dec's gradient
    # through the bias, whose value is b_enc: (b_dec - b_dec.detach()) W_enc^T is a (d,) x (d, m)
    # product, where autograd through x - b_dec would need a (B, m) x (m, d) matmul in the
    # backward. Centred, not x W_enc^T + (b_enc - W_enc b_dec): under bf16 autocast the large
    # dimensions that b_dec takes out would swell the rounding error of h several times.
    b_dec = None if sae.transcoder else sae.b_dec
    x_c = x_BD if b_dec is None else x_BD - b_dec.detach().to(x_BD.dtype)
    bias_M = sae.b_enc if b_dec is None else sae.b_enc - (b_dec - b_dec.detach()) @ sae.W_enc.T
    dev = x_BD.device.type
    mm = (dev, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_BD.dtype)
    share = SPARSE_BELOW.get(mm, 0)                         # by device and matmul dtype
    if sae.act_fn in ("relu", "jumprelu"):
        return encode_on_h(sae, x_c, bias_M, n_M, share)
    return encode_selected(sae, x_c, bias_M, n_M, k, share, mm)


def encode_on_h(sae: SAE, x_c, bias_M, n_M, share: float) -> Code:
    """relu and jumprelu: since n > 0, relu(h n) / n = relu(h) and JumpReLU's H(h n - theta) =
    H(h - theta / n): the code comes from h directly, with per-latent bounds, and saves the (B, m)
    passes that building c = h * n and dividing by n would take, forward and backward. Dense
    while many latents fire (a fresh SAE), sparse once few do (a trained one)."""
    h_BM = torch.addmm(bias_M, x_c, sae.W_enc.T)
    theta_M, eps = sae.log_threshold.exp(), sae.jumprelu_threshold_window
    jump = sae.act_fn == "jumprelu"
    with torch.no_grad():   # pairs that can get a gradient: h > 0, or c in JumpReLU's window
        lo_M = ((theta_M - eps / 2) / n_M).clamp(min=0) if jump else torch.zeros_like(n_M)
        on_M = theta_M / n_M if jump else lo_M                       # and those that fire
    if share:   # which path is faster, from ~64 of the tokens: the sparse one pays about half as
        # much for a window pair below the threshold (f = 0, only dL/df) as for one that fires.
        # Whole rows, which are cheap to read, not scattered pairs with their bounds gathered.
        h_s = h_BM.detach()[::max(1, len(h_BM) // 64)]
        cost = ((h_s > lo_M.to(h_s.dtype)).sum() + (h_s > on_M.to(h_s.dtype)).sum()) / (2 * h_s.numel())
    if not share or cost > share:
        if not jump:
            return Code(F.relu(h_BM), None, None, None, h_BM, n_M, False, Fast(x_c, h_BM))
        # the tanh penalty comes with f, for training (sparsity_loss)
        f_BM, P = JumpReLU.apply(h_BM, n_M, theta_M, eps, TANH_C if torch.is_grad_enabled() else None)
        return Code(f_BM, None, None, None, h_BM, n_M, False, Fast(x_c, h_BM, tanh_sum=P))
    # Few latents fire: the sparse code, and the backward of the pairs that can get a gradient only.
    rows, cols = (h_BM.detach() > lo_M.to(h_BM.dtype)).nonzero(as_tuple=True)
    h_sel = h_BM.detach()[rows, cols]
    bags = latent_bags(h_sel > on_M[cols].to(h_sel.dtype), cols, sae.d_sae)   # as JumpReLU / relu fire
    b_dec = None if sae.transcoder else sae.b_dec
    h_sel = SparseEncode.apply(x_c, sae.W_enc, sae.b_enc, b_dec, h_sel, rows, cols, bags)
    vals = JumpReLU.apply(h_sel, n_M[cols], theta_M[cols], eps)[0] if jump else F.relu(h_sel)
    return Code(None, rows, cols, vals, h_BM, n_M, False, Fast(x_c, bags=bags))


def encode_selected(sae: SAE, x_c, bias_M, n_M, k: int, share: float, mm: tuple) -> Code:
    """topk and batchtopk: select on c without autograd, then give the selected pairs' h its
    gradient (SparseEncode; a gather where h is dense). Sparse wherever SPARSE_BELOW has an entry:
    c = x_c (W_enc n)^T + b_enc n is one matmul, and the backward touches k latents per token.
    Elsewhere (a GPU under bf16) h is dense and so is the code."""
    B, M = len(x_c), sae.d_sae
    h_BM, estimate = None, bool(share) and mm == ("cpu", torch.float32) and M >= ESTIMATE_FROM
    if not share:
        h_BM = torch.addmm(bias_M, x_c, sae.W_enc.T)
        c_BM = h_BM.detach() * n_M.to(h_BM.dtype)
    else:
        with torch.no_grad():
            if estimate:
                c_BM, err_B, rel = estimate_c(x_c, sae.W_enc, sae.b_enc, n_M, ESTIMATE)
            else:
                c_BM = torch.addmm(bias_M * n_M, x_c, (sae.W_enc * n_M[:, None]).T)
    g_max = group_max(c_BM) if estimate else None       # computed once for both selections
    if sae.act_fn == "topk":
        c_Bk, idx_Bk = row_topk(c_BM, k, g_max)
        if h_BM is not None:                 # dense: along rows, no (rows, cols) pairs needed
            f_BM = torch.zeros_like(h_BM).scatter(1, idx_Bk, F.relu(h_BM.gather(1, idx_Bk)))
            return Code(f_BM, None, None, None, c_BM, n_M, True, Fast(x_c, h_BM))
        rows = torch.arange(B, device=c_BM.device).repeat_interleave(k)
        cols, c = idx_Bk.flatten(), c_Bk.flatten()
    else:   # the k*B largest of the batch (Bussmann et al. 2024); under torchrun, the rank's batch
        rows, cols, c = largest_pairs(c_BM, k * B, g_max)
    if estimate:
        rows, cols, c = exact_pairs(c_BM, g_max, rows, cols, err_B, rel, partial(c_at_pairs, sae, x_c, n_M),
                                    k if sae.act_fn == "topk" else None)
    bags = None if h_BM is not None else latent_bags(c > 0, cols, M)
    vals = F.relu(h_at(sae, x_c, h_BM, n_M, rows, cols, c, bags))     # f = relu(c) / n = relu(h)
    if sae.act_fn == "batchtopk" and sae.training:
        sae.update_threshold_(torch.where(vals > 0, c, torch.inf).min())
    fast = Fast(x_c, h_BM, bags, estimate)
    if h_BM is not None:
        f_BM = torch.zeros_like(h_BM).view(-1).scatter(0, rows * M + cols, vals).view(B, M)
        return Code(f_BM, None, None, None, c_BM, n_M, True, fast)
    return Code(None, rows, cols, vals, c_BM, n_M, True, fast)


def h_at(sae: SAE, x_c, h_BM, n_M, rows, cols, c, bags=None) -> torch.Tensor:
    """h = c / n at the pairs (rows, cols) of a selection, whose c it hands on, with the gradient.
    Dense h: a gather at flat indices, whose backward is a scatter-add (h_BM[rows, cols]'s, an
    accumulating index_put, sorts the pairs on CUDA). Else through SparseEncode."""
    if h_BM is not None:
        return h_BM.view(-1).gather(0, rows * h_BM.shape[1] + cols)
    b_dec = None if sae.transcoder else sae.b_dec
    return SparseEncode.apply(x_c, sae.W_enc, sae.b_enc, b_dec, c / n_M[cols], rows, cols, bags)


@torch.no_grad()
def c_at_pairs(sae: SAE, x_c, n_M, rows, cols) -> torch.Tensor:
    """c at pairs (rows sorted): rows of x_c . rows of W_enc, + b_enc, times n."""
    return (pair_dots(x_c, sae.W_enc, rows, cols) + sae.b_enc[cols]) * n_M[cols]


def fast_auxk_loss(sae: SAE, code: Code, resid_BD, dead_M, k_aux: int) -> torch.Tensor:
    """SAE.auxk_loss on a fast path's Code: the selection among the dead latents' columns only,
    their h with a sparse backward, decoded sparse."""
    B, x_c = len(resid_BD), code.fast.x_BD
    dead_idx = dead_M.nonzero().squeeze(1)
    if code.fast.estimated:
        # pre_BM is a bf16 estimate: the dead columns' exact c, a matmul over them, costs less than
        # exact_pairs would, its candidates being most of them
        with torch.no_grad():
            n_N = code.n_M[dead_idx]
            c_BN = torch.addmm(sae.b_enc[dead_idx] * n_N, x_c, (sae.W_enc[dead_idx] * n_N[:, None]).T)
    else:
        c_BN = code.c_BM.detach()[:, dead_idx]
    c, cols = row_topk(c_BN, k_aux)
    rows, cols = torch.arange(B, device=cols.device).repeat_interleave(k_aux), dead_idx[cols.flatten()]
    vals = F.relu(h_at(sae, x_c, code.fast.h_BM, code.n_M, rows, cols, c.flatten()))
    e_hat = SparseDecode.apply(vals, sae.W_dec, rows, cols, B)
    return (resid_BD.detach() - e_hat).pow(2).sum(-1).mean()


def sparse_decode(sae: SAE, code: Code, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """f W_dec of a sparse code, b_dec not added; of its latents lo <= i < hi only, if given (a
    Matryoshka prefix's: its pairs, whose rows stay sorted)."""
    if hi is not None:
        on = (code.cols >= lo) & (code.cols < hi)
        return SparseDecode.apply(code.vals[on], sae.W_dec, code.rows[on], code.cols[on], len(code.pre_BM))
    bags = code.fast.bags if code.fast is not None else None
    return SparseDecode.apply(code.vals, sae.W_dec, code.rows, code.cols, len(code.pre_BM), bags)


def row_blocks(*ts: torch.Tensor):
    """The same rows of each tensor, a block of about BLOCK elements at a time where the first is a
    (B, m) tensor on CPU; the whole tensors at once elsewhere (a vector, or on a GPU)."""
    t = ts[0]
    rows = max(1, BLOCK // t.shape[1] if t.dim() == 2 and t.device.type == "cpu" else len(t))
    for i in range(0, len(t), rows):
        yield [u[i:i + rows] for u in ts]


class JumpReLU(torch.autograd.Function):
    """f = a / n, a = c * H(c - theta), c = h * n: PlainJumpReLU on the contribution, with the same
    straight-through estimator: dL/dtheta_i = sum_batch dL/da * (-theta_i / eps) * 1[|c - theta_i|
    < eps/2 and c > 0], and dL/dh = dL/df * H(c - theta). Since n > 0, all of it can be written on h
    with per-latent bounds (H(c - theta) = H(h - theta/n)), so no (B, m) tensor of contributions is
    ever built. h is (B, m) with n, theta (m,), or a vector of selected pairs with their n, theta
    gathered.

    With tanh_c, it also returns the tanh penalty P = sum tanh(tanh_c * f * n) (else None), and
    the backward adds P's gradient to dL/df itself. On CPU a (B, m) h goes through both passes a
    block of rows at a time (row_blocks), in fp32 at least (bound): a block's dozen elementwise
    ops run in the core's L2 cache, where each op on the whole (B, m) would be a trip to memory,
    and only h is kept for the backward. Masks are 1.0 / 0.0 floats: a bool mask makes each op
    several times slower.
    """

    @staticmethod
    def forward(ctx, h, n, theta, eps, tanh_c=None):
        ctx.set_materialize_grads(False)
        n, theta = n.detach().float(), theta.detach()
        ctx.save_for_backward(h, n, theta)
        ctx.eps, ctx.tanh_c = eps, tanh_c
        f, on_M = torch.empty_like(h), JumpReLU.bound(theta / n, h)
        wide = torch.promote_types(on_M.dtype, torch.float32)           # sums in fp32 at least
        P, cn = (None, None) if tanh_c is None else (torch.zeros((), dtype=wide, device=h.device), tanh_c * n)
        for h_b, f_b in row_blocks(h, f):
            h_b = h_b.to(on_M.dtype)
            torch.mul(h_b, torch.gt(h_b, on_M, out=torch.empty_like(h_b)), out=f_b)
            if P is not None:
                P += torch.tanh(f_b.to(on_M.dtype) * cn).sum()
        return f, P

    @staticmethod
    def bound(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A per-latent bound on h, in the dtype the blocks are computed in: fp32 for a bf16 or
        fp16 h on CPU (their ops, tanh above all, run several times slower there), else h's.
        Rounded to h's dtype first: a bf16 h fires where the sparse path, which compares in bf16,
        says it does."""
        half = h.device.type == "cpu" and h.element_size() < 4
        return t.to(h.dtype).to(torch.float32 if half else h.dtype)

    @staticmethod
    def backward(ctx, g, g_P):
        h, n, theta = ctx.saved_tensors
        eps, tanh_c = ctx.eps, ctx.tanh_c
        if g is None and g_P is None:
            return None, None, None, None, None
        # c in (theta - eps/2, theta + eps/2) and c > 0, as bounds on h; dL/da = dL/df / n.
        lo, hi, on_M = (JumpReLU.bound(t, h) for t in (((theta - eps / 2) / n).clamp(min=0),
                                                         (theta + eps / 2) / n, theta / n))
        if g_P is not None:                   # P's gradient: d tanh(c f n) / df = c n (1 - tanh^2)
            cn, g_cn = tanh_c * n, g_P * tanh_c * n
        dh, sums = torch.empty_like(h), {}    # sums: over the batch, per latent, a block of rows at a time
        wide = torch.promote_types(on_M.dtype, torch.float32)

        def add(key, a, b):                   # sums[key] += a * b
            if key not in sums:
                sums[key] = torch.zeros(a.shape, dtype=wide, device=a.device)
            sums[key][:len(a)].addcmul_(a, b)
        for h_b, g_b, dh_b in row_blocks(h, torch.zeros_like(h) if g is None else g, dh):
            h_b, g_b = h_b.to(on_M.dtype), g_b.to(on_M.dtype)
            on = torch.gt(h_b, on_M, out=torch.empty_like(h_b))
            if g_P is not None:
                f_b = h_b * on
                g_pen = torch.ops.aten.tanh_backward(g_cn, torch.tanh(f_b * cn))
                add("n", f_b, g_pen)          # ... and d / dn = c f (1 - tanh^2)
                g_b = g_b + g_pen
            window = torch.gt(h_b, lo, out=torch.empty_like(h_b))
            window -= torch.ge(h_b, hi, out=torch.empty_like(h_b))    # lo < h < hi
            add("theta", g_b, window)
            torch.mul(g_b, on, out=dh_b)

        def total(key):                       # (no block at all: an empty batch, or no pair)
            s = sums.get(key, torch.zeros_like(n))
            return s.sum(0) if s.dim() > theta.dim() else s
        g_n = None if g_P is None else total("n") / n
        return dh, g_n, total("theta") * (-theta / eps) / n, None, None


def latent_bags(on: torch.Tensor, cols: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs where `on`, ordered by latent, and where each latent's run starts. Pairs off (f = 0,
    as JumpReLU's window below the threshold) get no weight gradient. The encoder's and decoder's
    backward share one, made in the forward: one sort per step instead of two."""
    keep = on.nonzero().squeeze(1)
    order = keep[torch.argsort(cols[keep])]
    return order, torch.searchsorted(cols[order], torch.arange(M, device=cols.device))


def sum_per_latent(x_BD: torch.Tensor, w, rows, cols, M: int, bags=None) -> torch.Tensor:
    """(M, d): row c = sum of w_j x[rows_j] over the pairs j of latent c (cols_j = c), the weight
    gradient of a sparse encode or decode, as one embedding_bag over the pairs sorted by latent, not
    autograd's scatter into a zero (M, d) matrix, which reads and writes all of it."""
    order, starts = bags or latent_bags(w != 0, cols, M)
    return F.embedding_bag(rows[order], x_BD, starts, mode="sum", per_sample_weights=w[order].to(x_BD.dtype))


def pair_dots(x_BD: torch.Tensor, W_MD: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[rows_j] . W[cols_j] for each pair j (rows sorted): embedding_bag's own kernel for the
    gradient of its per-sample weights (mode 0 = sum, one bag per row of x)."""
    offsets = torch.searchsorted(rows, torch.arange(len(x_BD), device=rows.device))
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(x_BD, W_MD, cols, offsets, rows, 0)


class SparseEncode(torch.autograd.Function):
    """h_j = h[rows_j, cols_j] at selected (token, latent) pairs, h = xc W_enc^T + b_enc with xc the
    centred x (x - b_dec; x for a transcoder, with no b_dec), from values computed without autograd.
    b_dec is an input for its gradient only. The backward touches only the selected latents (as
    EleutherAI's sparsify), not a dense (d, B) x (B, m) matmul; W_enc's gradient comes out
    (m, d_in) and contiguous, as W_enc is stored."""

    @staticmethod
    def forward(ctx, xc_BD, W_enc, b_enc, b_dec, h_sel, rows, cols, bags=None):
        ctx.save_for_backward(xc_BD, W_enc, rows, cols)
        ctx.bags = bags
        return h_sel.clone()

    @staticmethod
    def backward(ctx, g):
        xc_BD, W_enc, rows, cols = ctx.saved_tensors
        g_b_enc = g.new_zeros(len(W_enc), dtype=torch.float32).index_add_(0, cols, g.float())
        g_W = sum_per_latent(xc_BD, g, rows, cols, len(W_enc), ctx.bags)
        # b_dec's gradient is a matvec (no (d, m) outer product)
        g_b_dec = -(W_enc.T @ g_b_enc.to(W_enc.dtype)) if ctx.needs_input_grad[3] else None
        g_x = None
        if ctx.needs_input_grad[0]:             # dL/dx[b] = sum over b's pairs of g_j W_enc[c_j]
            offsets = torch.searchsorted(rows, torch.arange(len(xc_BD), device=rows.device))
            g_x = F.embedding_bag(cols, W_enc, offsets, mode="sum", per_sample_weights=g.to(W_enc.dtype))
        return g_x, g_W.to(W_enc.dtype), g_b_enc.to(W_enc.dtype), g_b_dec, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """y_BD[b] = sum over token b's pairs of vals_j W_dec[cols_j] (rows sorted): k decoder rows per
    token, not a dense (B, m) x (m, d) matmul. Pairs with vals = 0 (JumpReLU's window below the
    threshold) add nothing forward but get dL/dvals, which the threshold needs."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, B, bags=None):
        ctx.save_for_backward(vals, W_dec, rows, cols)
        ctx.bags = bags
        on = vals != 0
        offsets = torch.searchsorted(rows[on], torch.arange(B, device=rows.device))
        return F.embedding_bag(cols[on], W_dec, offsets, mode="sum",
                               per_sample_weights=vals[on].to(W_dec.dtype))

    @staticmethod
    def backward(ctx, g_BD):
        vals, W_dec, rows, cols = ctx.saved_tensors
        g_W = sum_per_latent(g_BD, vals, rows, cols, len(W_dec), ctx.bags)
        g_vals = pair_dots(g_BD, W_dec, rows, cols)            # dL/dvals_j = g[rows_j] . W_dec[cols_j]
        return g_vals.to(vals.dtype), g_W.to(W_dec.dtype), None, None, None, None


def group_max(c_BM: torch.Tensor) -> torch.Tensor:
    """On CPU, (B, m / 8): the maximum of each group of 8 columns g, g + m/8, ..., (one vectorized
    pass); elsewhere, or where 8 does not divide m, c_BM itself (groups of one)."""
    B, M = c_BM.shape
    return c_BM.view(B, 8, M // 8).amax(1) if c_BM.device.type == "cpu" and M % 8 == 0 else c_BM


def reaching(c_BM: torch.Tensor, g_max: torch.Tensor, t_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values), row-major, of the values of c_BM that reach t_B1 (B, 1), looked for
    only in the groups (group_max) whose maximum reaches it."""
    B, M = c_BM.shape
    G = g_max.shape[1]
    rows, groups = (g_max >= t_B1).nonzero(as_tuple=True)
    at = ((rows * M + groups)[:, None] + G * torch.arange(M // G, device=rows.device)).flatten()
    c = c_BM.view(-1)[at]
    reach = (c.view(len(rows), -1) >= t_B1[rows]).flatten().nonzero().squeeze(1)
    return at[reach], c[reach]


def largest_pairs(c_BM: torch.Tensor, n: int, g_max: torch.Tensor | None = None):
    """(rows, cols, values) of the n largest values of c_BM, row-major (each token's pairs together).
    A topk over all B*m values is slow on CPU. Instead a t that ~1.25 n values reach, estimated
    from every 61st value; a small topk trims the values that reach it to n (exact: t is lowered
    until n values reach it). They are looked for only in the groups of columns whose maximum
    reaches t (group_max), so most of c_BM is read once, by group_max."""
    B, M = c_BM.shape
    if c_BM.device.type != "cpu" and B * M <= 2 ** 25:
        # On a GPU one topk over all values wins while they are few; over ~30M it loses.
        c, at = c_BM.view(-1).topk(n, sorted=False)
        at, order = at.sort()
        return at // M, at % M, c[order]
    g_max, sample = group_max(c_BM) if g_max is None else g_max, c_BM.view(-1)[::61]
    for margin in (1.25, 2.0, 8.0, math.inf):
        t = sample.topk(min(len(sample), math.ceil(margin * n / 61) + 16), sorted=False).values.min() \
            if margin < math.inf else torch.tensor(-math.inf, dtype=c_BM.dtype, device=c_BM.device)
        at, c = reaching(c_BM, g_max, t.expand(B, 1))
        if len(at) >= n:
            break
    keep = c.topk(n, sorted=False).indices                           # back in row order: a mask
    keep = torch.zeros(len(at), dtype=torch.bool, device=at.device).index_fill_(0, keep, True)
    return at[keep] // M, at[keep] % M, c[keep]


def row_topk(c_BM: torch.Tensor, k: int, g_max: torch.Tensor | None = None):
    """(values, indices) of each row's k largest, as c_BM.topk(k, dim=-1, sorted=False). On CPU, topk
    walks every value. But a row's k largest lie in the k groups of columns with the largest maxima
    (k larger values stand before any other group), so: the maxima of the groups of 8 columns
    (group_max), the k best groups by the same rule, and a topk over their 8k values."""
    B, M = c_BM.shape
    if c_BM.device.type != "cpu" or M < 16 * k or M % 8:
        return c_BM.topk(k, dim=-1, sorted=False)
    G = M // 8
    groups = row_topk(group_max(c_BM) if g_max is None else g_max, k)[1]       # (B, k)
    idx = (groups.unsqueeze(-1) + G * torch.arange(8, device=c_BM.device)).view(B, 8 * k)
    vals, j = c_BM.gather(1, idx).topk(k, dim=-1, sorted=False)
    return vals, idx.gather(1, j)


def estimate_c(x_BD: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, n_M: torch.Tensor,
               kind: str = "bf16"):
    """c = x (W_enc n)^T + b_enc n from one bf16 or int8 matmul, with its bound: returns (estimate,
    err_B, rel), |c - estimate| <= err_B (B,) + rel |estimate|. With x = x' + dx, w = w' + dw (' the
    rounded or quantized values), x.w - x'.w' = x'.dw + dx.w is at most ||x'|| ||dw|| + ||dx|| ||w||
    (Cauchy-Schwarz), and so for the bias. x is centred (x - b_dec): the massive activations of a
    few dimensions of the residual stream, which b_dec takes out, would swell ||x|| and the bound
    with it, and so the number of candidates exact_pairs must check."""
    Wn_MD, b_M = W_enc * n_M[:, None], b_enc * n_M
    (B, D), M, norm = x_BD.shape, len(b_M), torch.linalg.vector_norm
    if kind == "int8":
        # each row of x and of W n to int8 at its own scale (max |value| -> 127); the int32 sums are
        # exact, and turning them into c rounds in fp32: at most 4 roundings of 2^-24 of |x'.w'|, and
        # of |c| for adding b (rel)
        s_B1, s_M1 = (t.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127 for t in (x_BD, Wn_MD))
        x_q, W_q = (x_BD / s_B1).round().to(torch.int8), (Wn_MD / s_M1).round().to(torch.int8)
        c_BM = torch._int_mm(x_q, W_q.T).float().mul_(s_B1).mul_(s_M1.T).add_(b_M)
        x_r, W_r = x_q * s_B1, W_q * s_M1
        x_B, dx_B = norm(x_r, dim=1), norm(x_BD - x_r, dim=1)
        w, w_r, dw = norm(Wn_MD, dim=1).max(), norm(W_r, dim=1).max(), norm(Wn_MD - W_r, dim=1).max()
        return c_BM, (x_B * (dw + 4 * 2 ** -24 * w_r) + dx_B * w) * 1.01, 1.01 * 2 ** -24
    # bf16: b_enc n rides in the matmul, a column of W against a column of ones in x (K padded to a
    # multiple of 32): no separate pass over the (B, m) output to add it. fp32 accumulation adds at
    # most d 2^-24 ||x'|| ||w'||, the one rounding of the output 2^-8 |c| (rel).
    x_BK = x_BD.new_zeros(B, D + 32, dtype=torch.bfloat16)
    W_MK = x_BD.new_zeros(M, D + 32, dtype=torch.bfloat16)
    x_BK[:, :D], x_BK[:, D], W_MK[:, :D], W_MK[:, D] = x_BD, 1, Wn_MD, b_M
    c_BM = x_BK @ W_MK.T
    x_b, W_b, b_b = x_BK[:, :D], W_MK[:, :D], W_MK[:, D]
    x_B, dx_B = norm(x_BD, dim=1), norm(x_BD - x_b, dim=1)
    w, dw = norm(Wn_MD, dim=1).max(), norm(Wn_MD - W_b, dim=1).max()
    err_B = (x_B + dx_B) * (dw + D * 2 ** -24 * w) + dx_B * w + (b_M - b_b).abs().max()
    return c_BM, err_B * 1.01, REL


REL = 1.01 * 2 ** -8    # the bf16 estimate's relative error: its rounding to bf16 (2^-8), 1% to spare


def exact_pairs(c_BM, g_max, rows, cols, err_B, rel, exact_c, k: int | None = None):
    """From a selection (rows, cols) made on an estimate c_BM of c (estimate_c), the same selection
    on the exact c: each row's k largest (k), or the batch's len(rows) largest. The selected pairs'
    exact c (exact_c(rows, cols)) bound the k-th largest exact value of a row (or the n-th of the
    batch) from below: L = their smallest. A pair whose estimate c_BM + err_B + rel |c_BM| falls
    short of L cannot be among them; every other pair gets its exact c too, and the selection is
    made again among those candidates (~1.5 per selected pair from bf16, a few from int8). L from
    exact values, not from the estimate's bounds, halves the window, and one token's large error (a
    massive activation) no longer widens every token's."""
    B, M = c_BM.shape
    c = exact_c(rows, cols)
    L_B = c.view(B, k).amin(1) if k else c.min().expand(B)
    Z_B = L_B - err_B                   # c_BM + rel |c_BM| >= Z_B exactly where c_BM >= t_B (rounded down)
    t_B = torch.where(Z_B >= 0, Z_B / (1 + rel), Z_B / (1 - rel))
    t_low = t_B.to(c_BM.dtype)
    t_B = torch.where(t_low > t_B, t_low.nextafter(t_low.new_tensor(-math.inf)), t_low)
    at, _ = reaching(c_BM, g_max, t_B[:, None])
    n, rows, cols = len(rows), at // M, at % M
    c = exact_c(rows, cols)
    if k is None:
        keep = c.topk(n, sorted=False).indices
        keep = torch.zeros(len(at), dtype=torch.bool, device=at.device).index_fill_(0, keep, True)
        return rows[keep], cols[keep], c[keep]
    counts = torch.bincount(rows, minlength=B)       # each row's candidates side by side, -inf after
    starts = counts.cumsum(0) - counts
    pos = torch.arange(len(rows), device=rows.device) - starts[rows]
    c_BN = c.new_full((B, int(counts.max())), -math.inf).index_put_((rows, pos), c)
    c, j = c_BN.topk(k, dim=1, sorted=False)
    at = (starts[:, None] + j).flatten()
    return rows[at], cols[at], c.flatten()


# =================================================================================================
# SETTINGS, FILES, EXPORT
#
# Not math: the check of the Matryoshka prefixes; save and load (whole files or none, and a checksum
# that tells a folder's config and weights apart from another SAE's); the export of a saved folder
# to the layouts that SAELens and circuit-tracer load.
# =================================================================================================


def checked_prefixes(sizes: list[int] | None, act_fn: str, d_sae: int) -> list[int] | None:
    """matryoshka_sizes as the SAE keeps them: strictly increasing, the last d_sae (added if absent)."""
    if sizes is None:
        return None
    if act_fn not in ("topk", "batchtopk"):
        raise ValueError(f"matryoshka_sizes takes act_fn batchtopk or topk (Matryoshka BatchTopK), not {act_fn}")
    sizes = [int(m) for m in sizes]
    sizes += [d_sae] * (not sizes or sizes[-1] != d_sae)
    if sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"matryoshka_sizes {sizes[:-1]}: prefix sizes must increase strictly from 1 to below "
                         f"d_sae = {d_sae}")
    return sizes


class SaveError(OSError):
    """A file that SAE.save could not write (a full disk, a quota, a read-only folder), in one line."""


def write_file(path: str, data: bytes):
    """data to path under a temporary name of this process, on the disk before it is renamed: a crash
    leaves the old file or the new one, never half of one. A failed write removes its partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:          # (made as the umask says)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        why = os.strerror(e.errno).lower() if e.errno else str(e)
        raise SaveError(f"cannot write {path}: {why} (its partial file is removed)") from None


def save_sae(sae: SAE, folder: str, extra: dict | None = None):
    """SAE.save: sae.safetensors, then config.json with the sha256 of that file's bytes, which load_sae
    checks (a crash between the two leaves new weights beside the old config: load_sae says so).
    "format": 2 marks W_enc stored (d_sae, d_in)."""
    os.makedirs(folder, exist_ok=True)
    weights = save({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()})
    write_file(os.path.join(folder, "sae.safetensors"), weights)
    config = {**(extra or {}), "format": 2, "sae": sae.config(), "sha256": hashlib.sha256(weights).hexdigest()}
    write_file(os.path.join(folder, "config.json"), json.dumps(config, indent=2).encode())


def load_sae(folder: str, device: str | torch.device = "cpu") -> SAE:
    """SAE.load, in eval mode. A folder whose weights are not the ones its config.json was saved with
    (another SAE's, a file cut short) fails in one line; one saved before checksums loads unchecked."""
    for name in ("config.json", "sae.safetensors"):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} has no {name}: is it a folder that train.py saved?")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "sae.safetensors"), "rb") as f:
        data = f.read()
    want, have = config.get("sha256"), hashlib.sha256(data).hexdigest()
    try:
        state = load(data)
    except SafetensorError:
        raise ValueError(f"{folder}: sae.safetensors is unreadable ({len(data):,} bytes): cut short or damaged"
                         + (", its sha256 is not the one config.json recorded" if want else "")) from None
    if config.get("format", 1) == 1:       # saved with W_enc as (d_in, d_sae)
        state["W_enc"] = state["W_enc"].T.contiguous()
    sae = SAE(**config["sae"], dtype=state["W_enc"].dtype, device=device)
    want_shapes, have_shapes = ({k: tuple(v.shape) for k, v in d.items()} for d in (sae.state_dict(), state))
    if want_shapes != have_shapes:   # files of two SAEs: say which tensors disagree, in one line
        diff = [f"{k} {want_shapes.get(k)} vs {have_shapes.get(k)}" for k in sorted(want_shapes | have_shapes)
                if want_shapes.get(k) != have_shapes.get(k)]
        raise ValueError(f"{folder}: config.json and sae.safetensors are not one SAE's (shapes of the "
                         f"config vs the weights: {'; '.join(diff)})")
    if want and want != have:
        raise ValueError(f"{folder}: sae.safetensors is not the file saved with its config.json (sha256 "
                         f"{have[:12]}..., recorded {want[:12]}...): another SAE's weights, or changed since")
    sae.load_state_dict(state)
    return sae.eval()        # for inference: a forward in train mode moves BatchTopK's threshold


SAELENS_FORMAT = "6.0.0"     # the cfg.json layout written here: SAELens 6's (its 'metadata' block)


def contribution_weights(folder: str, tool: str) -> tuple[SAE, dict, dict]:
    """The SAE saved in folder (as train.py saves it: the normalization folded in), its training
    record, and its weights as another tool reads them, which ranks (TopK) and thresholds (JumpReLU)
    h itself, where this SAE works on the contribution c = h n, n_i = ||W_dec[i]||. Folding the norms
    into the weights, W_enc[i] n_i, b_enc[i] n_i, W_dec[i] / n_i, makes the tool's h our c: its TopK
    keeps our latents, its thresholds are ours (theta_i), its latent activations our contributions
    f_i n_i (decoder rows of norm 1) and its reconstruction ours. W_enc stays (d_sae, d_in); BatchTopK
    goes as its JumpReLU conversion (every theta_i the running threshold)."""
    sae = load_sae(folder)
    with open(os.path.join(folder, "config.json")) as f:
        train = json.load(f).get("train", {})
    if sae.act_fn == "batchtopk":
        if not sae.threshold > 0:
            raise ValueError(f"{folder}: this BatchTopK SAE has no running threshold to export its JumpReLU "
                             f"conversion to {tool} with")
        sae.to_jumprelu_()
    p = {k: v.detach().double() for k, v in sae.named_parameters()}
    n = p["W_dec"].norm(dim=1)
    weights = {"W_enc": p["W_enc"] * n[:, None], "b_enc": p["b_enc"] * n, "W_dec": p["W_dec"] / n[:, None],
               "b_dec": p["b_dec"]}
    if sae.act_fn == "jumprelu":
        weights["threshold"] = p["log_threshold"].exp()
    if sae.skip_connection:
        weights["W_skip"] = p["W_skip"]                                  # (d_out, d_in), as ours
    return sae, train, weights


def save_weights(path: str, weights: dict, dtype: torch.dtype, metadata: dict | None = None):
    """weights, in the SAE's dtype, as a .safetensors file (metadata: str -> str, in its header)."""
    write_file(path, save({k: v.to(dtype).contiguous() for k, v in weights.items()}, metadata))


def export_saelens(folder: str, out: str):
    """The SAE saved in folder as the folder that SAELens's SAE.load_from_disk(out) reads: cfg.json
    + sae_weights.safetensors, with SAELens's architecture names (standard, jumprelu, topk,
    transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder) and the weights of
    contribution_weights. SAELens has no TopK transcoder: that is refused with a ValueError."""
    sae, train, weights = contribution_weights(folder, "SAELens")
    arch = {("relu", False): "standard", ("jumprelu", False): "jumprelu", ("topk", False): "topk",
            ("relu", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder"}
    arch = arch.get((sae.act_fn, sae.transcoder))
    if arch is None:
        raise ValueError(f"{folder}: SAELens has no {sae.act_fn} transcoder to export this one as")
    arch = arch.replace("transcoder", "skip_transcoder") if sae.skip_connection else arch
    weights["W_enc"] = weights["W_enc"].T                               # SAELens's W_enc: (d_in, d_sae)
    hook = train.get("hook_point_in", "")
    meta = {"sae_lens_version": SAELENS_FORMAT, "model_name": train.get("model"), "hook_name": hook or None,
            "hook_name_out": train.get("hook_point_out") if sae.transcoder else None,
            "context_size": train.get("context_size"), "dataset_path": train.get("dataset"), "prepend_bos": True}
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": str(sae.W_enc.dtype)[6:],
           "device": "cpu", "apply_b_dec_to_input": not sae.transcoder, "normalize_activations": "none",
           "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
           "metadata": {k: v for k, v in meta.items() if v is not None}}
    cfg |= {"d_out": sae.d_out} if sae.transcoder else {}
    cfg |= {"k": sae.top_k, "rescale_acts_by_decoder_norm": False} if sae.act_fn == "topk" else {}
    os.makedirs(out, exist_ok=True)
    save_weights(os.path.join(out, "sae_weights.safetensors"), weights, sae.W_enc.dtype)
    write_file(os.path.join(out, "cfg.json"), json.dumps(cfg, indent=2).encode())


def export_circuit_tracer(folder: str, out: str):
    """The transcoder saved in folder as the single-layer transcoder file out (.safetensors) that
    circuit-tracer's load_relu_transcoder(out, layer) reads: W_enc, W_dec (d_sae, d_model), b_enc,
    b_dec, W_skip (d_model, d_model) of a skip transcoder, and "activation_function.threshold" of a
    JumpReLU (without it: ReLU), the weights of contribution_weights. Which layer and hooks it
    replaces go in circuit-tracer's transcoder-set config (the file's metadata records ours). Its
    transcoders replace an MLP (d_in = d_out) and its loader has no TopK: others are refused."""
    sae, train, weights = contribution_weights(folder, "circuit-tracer")
    if not sae.transcoder or sae.d_in != sae.d_out or sae.act_fn == "topk":
        kind = f"{sae.act_fn} {'transcoder' if sae.transcoder else 'SAE'} ({sae.d_in} -> {sae.d_out})"
        raise ValueError(f"{folder}: circuit-tracer reads ReLU and JumpReLU transcoders with d_in = d_out, "
                         f"not this {kind}")
    if "threshold" in weights:
        weights["activation_function.threshold"] = weights.pop("threshold")
    hooks = {k: str(train[k]) for k in ("model", "hook_point_in", "hook_point_out") if train.get(k)}
    save_weights(out, weights, sae.W_enc.dtype, hooks)


if __name__ == "__main__":       # python sae.py export-saelens results/sae OUT  (or export-circuit-tracer OUT.safetensors)
    import sys
    commands = {"export-saelens": export_saelens, "export-circuit-tracer": export_circuit_tracer}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        sys.exit(f"usage: python sae.py {{{','.join(commands)}}} SAVED_FOLDER OUT")
    try:
        commands[sys.argv[1]](sys.argv[2], sys.argv[3])
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {sys.argv[3]}")
