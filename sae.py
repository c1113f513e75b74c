"""The sparse autoencoder: activation functions, init, losses, BatchTopK -> JumpReLU, save/load.

Notation (see README): x (B, d_in) the input activation, y (B, d_out) the target (y = x for an SAE,
another hook point for a transcoder), m = d_sae latents.

    h = (x - b_dec) W_enc + b_enc          (no b_dec subtraction for a transcoder)
    c_i = h_i * n_i,  n_i = ||W_dec[i]||   the size of what latent i adds to the reconstruction
    f_i = act(c_i) / n_i
    y_hat = f W_dec + b_dec

Decoder rows are not forced to unit norm: TopK ranks, and JumpReLU thresholds, the contribution c
(as in Anthropic's "Towards Monosemanticity", where the L1 penalty is weighted by ||W_dec[i]||).
Imports torch and safetensors only.
"""
import inspect
import json
import math
import os
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

ActFn = Literal["relu", "jumprelu", "topk", "batchtopk"]


class Code(NamedTuple):
    """The code of a batch: f_BM (B, m) where it is dense (relu, jumprelu while many latents fire;
    topk, batchtopk with no SPARSE_BELOW entry), else None and token rows[j] uses latent cols[j]
    with value vals[j], rows sorted."""
    f_BM: torch.Tensor | None
    vals: torch.Tensor | None
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    pre_BM: torch.Tensor  # relu/jumprelu: h = (x - b_dec) W_enc + b_enc, with autograd; topk/batchtopk:
                          # c = h * n, without (an estimate in bf16 where exact_cols is set)
    n_M: torch.Tensor     # decoder row norms
    pre_is_c: bool = False
    select: object = None  # topk/batchtopk: (rows, cols[, their c]) -> h at those pairs, with gradient
    bags: tuple | None = None  # sparse code: latent_bags of the pairs that fired
    exact_cols: object = None  # where pre_BM is estimate_c's bf16 c: cols -> their exact (B, len(cols)) c
    tanh_sum: torch.Tensor | None = None  # dense jumprelu: sum tanh(TANH_C f n), made with f (JumpReLU)

    @property
    def c_BM(self) -> torch.Tensor:
        """The contributions h_i * n_i that the activation functions rank and threshold."""
        return self.pre_BM if self.pre_is_c else self.pre_BM * self.n_M.to(self.pre_BM.dtype)

    def dense(self) -> torch.Tensor:
        """(B, m) latent activations f, zero where a latent is off, whichever path made the code."""
        if self.f_BM is not None:
            return self.f_BM
        f_BM = torch.zeros(self.pre_BM.shape, dtype=self.vals.dtype, device=self.vals.device)
        return f_BM.index_put((self.rows, self.cols), self.vals)

    def active(self) -> torch.Tensor:
        """(B, m) 1.0 where a latent fired (f is never negative), as floats: bools sum 2x slower."""
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


TANH_C = 4.0        # the tanh penalty's c (README)
BLOCK = 2 ** 18     # elements of a row block of a (B, m) tensor on CPU: 1 MB in fp32 (see JumpReLU)


def row_blocks(*ts: torch.Tensor):
    """The same rows of each tensor, a block of about BLOCK elements at a time where the first is a
    (B, m) tensor on CPU; the whole tensors at once elsewhere (a vector, or on a GPU)."""
    t = ts[0]
    rows = max(1, BLOCK // t.shape[1] if t.dim() == 2 and t.device.type == "cpu" else len(t))
    for i in range(0, len(t), rows):
        yield [u[i:i + rows] for u in ts]


class JumpReLU(torch.autograd.Function):
    """f = a / n, a = c * H(c - theta), c = h * n: JumpReLU on the contribution. Its straight-through
    estimator (Rajamanoharan et al. 2024, "Jumping Ahead"), a rectangle of width eps, gives
    dL/dtheta_i = sum_batch dL/da * (-theta_i / eps) * 1[|c - theta_i| < eps/2 and c > 0],
    and dL/dh = dL/df * H(c - theta). Since n > 0, all of it can be written on h with per-latent
    bounds (H(c - theta) = H(h - theta/n)), so no (B, m) tensor of contributions is ever built
    (jumprelu step 0.54x -> 0.77x the dense TopK reference step, fp32, 2 CPU cores, d=768, 8x).
    h is (B, m) with n, theta (m,), or a vector of selected pairs with their n, theta gathered.

    With tanh_c, it also returns the tanh penalty P = sum tanh(tanh_c * f * n) (else None), and
    the backward adds P's gradient to dL/df itself. On CPU a (B, m) h goes through both passes a
    block of rows at a time (row_blocks), in fp32 at least (bound): a block's dozen elementwise
    ops run in the core's L2 cache, where each op on the whole (B, m) was a trip to memory, and
    only h is kept for the backward. JumpReLU and its penalty, forward and backward, d=768, batch
    4096, 2 CPU cores: fp32 1.36x at 8x, 1.34x at 32x; bf16 0.99x, 1.11x. The fresh jumprelu
    step (fp32): 1.06-1.08x at 8x, 1.10x at 32x. Masks are 1.0 / 0.0 floats: a bool mask makes
    each op 2-8x slower.
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
    share one, made in the forward (a sort fewer: fp32 steps at 8x, topk 1.04-1.09x, batchtopk
    1.01-1.06x, jumprelu at L0 = k 1.02-1.04x)."""
    keep = on.nonzero().squeeze(1)
    order = keep[torch.argsort(cols[keep])]
    return order, torch.searchsorted(cols[order], torch.arange(M, device=cols.device))


def sum_per_latent(x_BD: torch.Tensor, w, rows, cols, M: int, bags=None) -> torch.Tensor:
    """(M, d): row c = sum of w_j x[rows_j] over the pairs j of latent c (cols_j = c), the weight
    gradient of a sparse encode or decode, as one embedding_bag over the pairs sorted by latent, not
    autograd's scatter into a zero (M, d) matrix (topk step, fp32: 1.17x at 8x and 32x; 1.10x more at
    32x for the decoder's)."""
    order, starts = bags or latent_bags(w != 0, cols, M)
    return F.embedding_bag(rows[order], x_BD, starts, mode="sum", per_sample_weights=w[order].to(x_BD.dtype))


def pair_dots(x_BD: torch.Tensor, W_MD: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[rows_j] . W[cols_j] for each pair j (rows sorted): embedding_bag's own kernel for the
    gradient of its per-sample weights (mode 0 = sum, one bag per row of x)."""
    offsets = torch.searchsorted(rows, torch.arange(len(x_BD), device=rows.device))
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(x_BD, W_MD, cols, offsets, rows, 0)


class SparseEncode(torch.autograd.Function):
    """h_j = h[rows_j, cols_j] at selected (token, latent) pairs, h = xc W_enc + b_enc with xc the
    centred x (x - b_dec; x for a transcoder, with no b_dec), from values computed without autograd.
    b_dec is an input for its gradient only. The backward touches only the selected latents (as
    EleutherAI's sparsify), not a dense (d, B) x (B, m) matmul."""

    @staticmethod
    def forward(ctx, xc_BD, W_enc, b_enc, b_dec, h_sel, rows, cols, bags=None):
        ctx.save_for_backward(xc_BD, W_enc, rows, cols)
        ctx.bags = bags
        return h_sel.clone()

    @staticmethod
    def backward(ctx, g):
        xc_BD, W_enc, rows, cols = ctx.saved_tensors
        g_b_enc = g.new_zeros(W_enc.shape[1], dtype=torch.float32).index_add_(0, cols, g.float())
        g_W = sum_per_latent(xc_BD, g, rows, cols, W_enc.shape[1], ctx.bags).T
        # b_dec's gradient is a matvec (no (d, m) outer product)
        g_b_dec = -(W_enc @ g_b_enc.to(W_enc.dtype)) if ctx.needs_input_grad[3] else None
        g_x = None
        if ctx.needs_input_grad[0]:             # dL/dx[b] = sum over b's pairs of g_j W_enc[:, c_j]
            offsets = torch.searchsorted(rows, torch.arange(len(xc_BD), device=rows.device))
            g_x = F.embedding_bag(cols, W_enc.T, offsets, mode="sum", per_sample_weights=g.to(W_enc.dtype))
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
    reaches t (group_max). 2 CPU cores: (1024, 4608) 17 -> 12 ms, (4096, 6144) 102 -> 72 ms,
    (4096, 24576) 300 -> 133 ms, against a topk over all values' ~6x that."""
    B, M = c_BM.shape
    if c_BM.device.type != "cpu" and B * M <= 2 ** 25:
        # On a GPU one topk over all values wins at (4096, 6144), H200: 1.0 -> 0.5-0.7 ms; at 32x
        # (100M values) it loses, 1.2-1.3 -> 1.3-2.2 ms.
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
    (group_max), the k best groups by the same rule, and a topk over their 8k values. 2 CPU
    cores, k = 64: (B, m) = (1024, 4608) 17 -> 8 ms, (4096, 24576) 208 -> 88 ms."""
    B, M = c_BM.shape
    if c_BM.device.type != "cpu" or M < 16 * k or M % 8:
        return c_BM.topk(k, dim=-1, sorted=False)
    G = M // 8
    groups = row_topk(group_max(c_BM) if g_max is None else g_max, k)[1]       # (B, k)
    idx = (groups.unsqueeze(-1) + G * torch.arange(8, device=c_BM.device)).view(B, 8 * k)
    vals, j = c_BM.gather(1, idx).topk(k, dim=-1, sorted=False)
    return vals, idx.gather(1, j)


def estimate_c(x_BD: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, n_M: torch.Tensor):
    """c = x (W_enc n) + b_enc n from one bf16 matmul, and err_B (B,): |c - estimate| <= err_B + REL
    |estimate|. With x = x' + dx, w = w' + dw (' rounded to bf16), x.w - x'.w' = x'.dw + dx.w is at
    most ||x'|| ||dw|| + ||dx|| ||w|| (Cauchy-Schwarz), and so for the bias; fp32 accumulation adds
    at most d 2^-24 ||x'|| ||w'||, the one rounding of the output 2^-8 |c|. x is centred (x - b_dec):
    the massive activations of a few dimensions of the residual stream, which b_dec takes out, would
    swell ||x|| and the bound with it (1.4x fewer candidates centred)."""
    Wn_DM, b_M = W_enc * n_M, b_enc * n_M
    (B, D), M = x_BD.shape, len(b_M)
    # b_enc n rides in the matmul, a row of W against a column of ones in x (K padded to a multiple of
    # 32): no separate pass to add it (1.02-1.13x at 32x)
    x_BK = x_BD.new_zeros(B, D + 32, dtype=torch.bfloat16)
    W_MK = x_BD.new_zeros(M, D + 32, dtype=torch.bfloat16)
    x_BK[:, :D], x_BK[:, D], W_MK[:, :D], W_MK[:, D] = x_BD, 1, Wn_DM.T, b_M
    c_BM = x_BK @ W_MK.T
    x_b, W_b, b_b = x_BK[:, :D], W_MK[:, :D].T, W_MK[:, D]
    norm = torch.linalg.vector_norm
    x_B, dx_B = norm(x_BD, dim=1), norm(x_BD - x_b, dim=1)
    w, dw = norm(Wn_DM, dim=0).max(), norm(Wn_DM - W_b, dim=0).max()
    err_B = (x_B + dx_B) * (dw + len(Wn_DM) * 2 ** -24 * w) + dx_B * w + (b_M - b_b).abs().max()
    return c_BM, err_B * 1.01


REL = 1.01 * 2 ** -8    # estimate_c's relative error: its rounding to bf16 (2^-8), 1% to spare


def exact_pairs(c_BM, g_max, rows, cols, err_B, exact_c, k: int | None = None):
    """From a selection (rows, cols) made on an estimate c_BM of c (estimate_c), the same selection
    on the exact c: each row's k largest (k), or the batch's len(rows) largest. The selected pairs'
    exact c (exact_c(rows, cols)) bound the k-th largest exact value of a row (or the n-th of the
    batch) from below: L = their smallest. A pair whose estimate c_BM + err_B + REL |c_BM| falls
    short of L cannot be among them; every other pair gets its exact c too, and the selection is
    made again among those candidates (~1.5 per selected pair). L from exact values, not from the
    estimate's bounds, halves the window, and one token's large error (a massive activation) no
    longer widens every token's (batchtopk at 32x: 5,620 candidates per token in one batch)."""
    B, M = c_BM.shape
    c = exact_c(rows, cols)
    L_B = c.view(B, k).amin(1) if k else c.min().expand(B)
    Z_B = L_B - err_B                   # c_BM + REL |c_BM| >= Z_B exactly where c_BM >= t_B (rounded down)
    t_B = torch.where(Z_B >= 0, Z_B / (1 + REL), Z_B / (1 - REL))
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


# fp32 topk and batchtopk on a CPU with bf16 matrix units (AMX: bf16 matmuls 2.6-10x fp32's here)
# select on estimate_c's bf16 c, then exact_pairs, where m >= this. 2 CPU cores, d=768, batch 4096,
# the step: 32x topk 1.19x, batchtopk 1.46x; 16x 1.05-1.19x; 8x 0.86-1.08x, so not there.
ESTIMATE_FROM = 12288 if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else math.inf


# relu / jumprelu take the sparse code when at most this share of (token, latent) pairs fire (a
# window pair below JumpReLU's threshold counts half); topk / batchtopk wherever there is an entry.
# Crossovers measured at d=768, batch 4096: 2 CPU cores ~9% fp32, ~4.5% bf16 and fp16 (~7% / 2.5%
# at d=576, batch 1024); H200 fp32 ~0.5% (relu at L0 96: sparse 0.88x the dense step at 8x, 1.81x
# at 32x; topk 1.07x, 1.86x). H200 bf16: dense (the sparse steps ran 0.5-0.9x), so no entry.
SPARSE_BELOW = {("cpu", torch.float32): 0.07, ("cpu", torch.bfloat16): 0.03, ("cpu", torch.float16): 0.04,
                ("cuda", torch.float32): 0.005}


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, act_fn: ActFn = "topk", top_k: int = 64,
                 d_out: int | None = None, transcoder: bool = False,
                 jumprelu_threshold_window: float = 0.1, jumprelu_init_threshold: float = 0.1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if act_fn not in get_args(ActFn):
            raise ValueError(f"unknown act_fn {act_fn!r}: use relu, jumprelu, topk or batchtopk")
        d_out = d_out or d_in
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.act_fn, self.top_k, self.transcoder = act_fn, top_k, transcoder
        self.jumprelu_threshold_window = jumprelu_threshold_window
        self.jumprelu_init_threshold = jumprelu_init_threshold
        kw = dict(dtype=dtype, device=device)
        # Random decoder directions; the encoder starts as the decoder's transpose.
        W_dec = torch.randn(d_sae, d_out, **kw)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                                          # (m, d_out)
        # W_enc (d_in, m) is column-major: its sparse gradient is built a latent (a row of W_enc.T) at a time
        self.W_enc = nn.Parameter(W_dec.T.clone() if d_in == d_out
                                  else (torch.randn(d_sae, d_in, **kw) / d_in ** 0.5).T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        # JumpReLU thresholds live in fp32 whatever the SAE's dtype: exp() of a bf16 log is coarse.
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(jumprelu_init_threshold),
                                                     dtype=torch.float32, device=device))
        # BatchTopK's running threshold: the smallest contribution it kept, averaged over batches.
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))

    def config(self) -> dict:
        """The constructor arguments that rebuild this SAE (saved as config.json)."""
        names = inspect.signature(SAE.__init__).parameters
        return {k: getattr(self, k) for k in names if k not in ("self", "dtype", "device")}

    # ---------------------------------------------------------------------------------------
    # forward

    def encode(self, x_BD: torch.Tensor, k: int | None = None) -> Code:
        k = self.top_k if k is None else k
        if self.act_fn in ("topk", "batchtopk") and not 1 <= k <= self.d_sae:
            raise ValueError(f"k = {k}: {self.act_fn} takes 1 <= k <= d_sae = {self.d_sae}")
        n_M = self.W_dec.norm(dim=1)
        # h = (x - b_dec) W_enc + b_enc with x centred on a detached b_dec, and b_dec's gradient through
        # the bias, whose value is b_enc: (b_dec - b_dec.detach()) W_enc is a (d,) x (d, m) product, where
        # autograd through x - b_dec would need a (B, m) x (m, d) matmul in the backward. Centred, not
        # x W_enc + (b_enc - b_dec W_enc): under bf16 autocast the large dimensions that b_dec takes out
        # would swell the rounding error of h several times.
        b_dec = None if self.transcoder else self.b_dec
        x_c = x_BD if b_dec is None else x_BD - b_dec.detach().to(x_BD.dtype)
        bias_M = self.b_enc if b_dec is None else self.b_enc - (b_dec - b_dec.detach()) @ self.W_enc
        B, M, dev = len(x_BD), self.d_sae, x_BD.device.type
        mm = (dev, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_BD.dtype)
        share = SPARSE_BELOW.get(mm, 0)                         # by device and matmul dtype

        # relu, jumprelu: since n > 0, relu(h n) / n = relu(h) and JumpReLU's H(h n - theta) =
        # H(h - theta / n): the code comes from h directly. Two fewer (B, m) passes forward and
        # four backward than building c = h * n (relu step 0.75x -> 1.01x the dense TopK reference
        # step in fp32 and 0.73x -> 2.4x under bf16 autocast, 2 CPU cores, d=768, 8x).
        if self.act_fn in ("relu", "jumprelu"):
            h_BM = torch.addmm(bias_M, x_c, self.W_enc)
            theta_M, eps = self.log_threshold.exp(), self.jumprelu_threshold_window
            jump = self.act_fn == "jumprelu"
            with torch.no_grad():   # pairs that can get a gradient: h > 0, or c in JumpReLU's window
                lo_M = ((theta_M - eps / 2) / n_M).clamp(min=0) if jump else torch.zeros_like(n_M)
                on_M = theta_M / n_M if jump else lo_M                       # and those that fire
            if share:   # which path is faster, from ~64 of the tokens: the sparse one pays about half
                # as much for a window pair below the threshold (f = 0, only dL/df) as for one that fires.
                # Whole rows, not every 61st pair with its bounds gathered: 8.7 -> 1.7 ms at (4096, 6144),
                # 32 -> 3.8 ms at (4096, 24576), on 2 CPU cores.
                h_s = h_BM.detach()[::max(1, B // 64)]
                cost = ((h_s > lo_M.to(h_s.dtype)).sum() + (h_s > on_M.to(h_s.dtype)).sum()) / (2 * h_s.numel())
            if not share or cost > share:
                if self.act_fn == "relu":
                    return Code(F.relu(h_BM), None, None, None, h_BM, n_M)
                # the tanh penalty comes with f, for training (sparsity_loss)
                f_BM, P = JumpReLU.apply(h_BM, n_M, theta_M, eps, TANH_C if torch.is_grad_enabled() else None)
                return Code(f_BM, None, None, None, h_BM, n_M, tanh_sum=P)
            # Once trained, ~k latents per token fire: the sparse code and backward of topk (exact; at
            # L0 = 64, jumprelu 0.80x -> 2.2x and relu 1.1x -> 2.6x the dense reference, fp32, d=768, 8x).
            rows, cols = (h_BM.detach() > lo_M.to(h_BM.dtype)).nonzero(as_tuple=True)
            h_sel = h_BM.detach()[rows, cols]
            bags = latent_bags(h_sel > on_M[cols].to(h_sel.dtype), cols, M)     # as JumpReLU / relu fire
            h_sel = SparseEncode.apply(x_c, self.W_enc, self.b_enc, b_dec, h_sel, rows, cols, bags)
            vals = JumpReLU.apply(h_sel, n_M[cols], theta_M[cols], eps)[0] if jump else F.relu(h_sel)
            return Code(None, vals, rows, cols, h_BM, n_M, bags=bags)
        # topk / batchtopk: select without autograd, then the gradient of the selected latents only
        # (SparseEncode). c = x (W_enc n) + bias n saves a (B, m) pass (1.84x -> 2.25x the dense
        # reference, fp32, 8x). No SPARSE_BELOW entry (GPU bf16): dense (H200 8x: 1.03x; sparse 0.68x).
        @torch.no_grad()
        def exact_c(rows, cols):   # c at pairs (rows sorted): rows of x . columns of W_enc, + bias, * n
            return (pair_dots(x_c, self.W_enc.T, rows, cols) + bias_M[cols]) * n_M[cols]

        @torch.no_grad()
        def exact_cols(cols):      # c of all tokens at these latents, an fp32 matmul
            return torch.addmm(bias_M[cols] * n_M[cols], x_c, self.W_enc[:, cols] * n_M[cols])

        estimate = False
        if dense := not share:
            h_BM = torch.addmm(bias_M, x_c, self.W_enc)
            c_BM = h_BM.detach() * n_M.to(h_BM.dtype)
        else:
            with torch.no_grad():
                if mm == ("cpu", torch.float32) and M >= ESTIMATE_FROM:
                    c_BM, err_B = estimate_c(x_c, self.W_enc, self.b_enc, n_M)
                    estimate = True
                else:
                    c_BM = torch.addmm(bias_M * n_M, x_c, self.W_enc * n_M)

        # h = c / n at pairs, with the gradient; a selection hands on its c (no 2nd gather: 1.04-1.07x).
        # Dense: a gather at flat indices; its backward is a scatter-add, where h_BM[rows, cols]'s (an
        # accumulating index_put) sorts the pairs on CUDA. With the scatter below: batchtopk under bf16,
        # H200, 1.06x at 8x.
        def h_at(rows, cols, c=None, bags=None):
            if dense:
                return h_BM.view(-1).gather(0, rows * M + cols)
            c = c if c is not None else exact_c(rows, cols) if estimate else c_BM[rows, cols]
            return SparseEncode.apply(x_c, self.W_enc, self.b_enc, b_dec, c / n_M[cols], rows, cols, bags)
        g_max = group_max(c_BM) if estimate else None      # computed once for both selections
        if self.act_fn == "topk":
            c_Bk, idx_Bk = row_topk(c_BM, k, g_max)
            if dense:                          # along rows: 1.15x over (rows, cols) pairs (H200, 8x)
                f_BM = torch.zeros_like(h_BM).scatter(1, idx_Bk, F.relu(h_BM.gather(1, idx_Bk)))
                return Code(f_BM, None, None, None, c_BM, n_M, pre_is_c=True, select=h_at)
            rows = torch.arange(B, device=c_BM.device).repeat_interleave(k)
            cols, c = idx_Bk.flatten(), c_Bk.flatten()
        else:   # the k*B largest of the batch (Bussmann et al. 2024); under torchrun, the rank's batch
            rows, cols, c = largest_pairs(c_BM, k * B, g_max)
        if estimate:
            rows, cols, c = exact_pairs(c_BM, g_max, rows, cols, err_B, exact_c, k if self.act_fn == "topk" else None)
        bags = None if dense else latent_bags(c > 0, cols, M)
        vals = F.relu(h_at(rows, cols, c, bags))     # f = relu(c) / n = relu(h)
        if self.act_fn == "batchtopk" and self.training:
            self.update_threshold_(torch.where(vals > 0, c, torch.inf).min())
        f_BM = torch.zeros_like(h_BM).view(-1).scatter(0, rows * M + cols, vals).view(B, M) if dense else None
        return Code(f_BM, vals, rows, cols, c_BM, n_M, pre_is_c=True, select=h_at, bags=bags,
                    exact_cols=exact_cols if estimate else None)

    def decode(self, code: Code | torch.Tensor) -> torch.Tensor:
        """y_hat from a Code (encode's), or from latent activations f (..., d_sae): edited ones, say."""
        if isinstance(code, torch.Tensor):
            return code.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if code.f_BM is not None:
            return code.f_BM @ self.W_dec + self.b_dec
        B = len(code.pre_BM)
        return SparseDecode.apply(code.vals, self.W_dec, code.rows, code.cols, B, code.bags) + self.b_dec

    def forward(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, Code]:
        """y_hat, shaped as x (..., d_in) but with d_out, and the Code of its tokens (tokens, d_sae).
        x is cast to the SAE's dtype; k (topk, batchtopk) defaults to top_k."""
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(f"x is {tuple(x.shape)}: the SAE takes (..., d_in = {self.d_in}) activations")
        code = self.encode(x.reshape(-1, self.d_in).to(self.W_enc.dtype), k)
        return self.decode(code).view(*x.shape[:-1], self.d_out), code

    @torch.no_grad()
    def update_threshold_(self, t: torch.Tensor, decay: float = 0.95):
        """Exponential moving average of BatchTopK's smallest kept contribution. A memory of ~20
        steps follows the SAE as it trains, so the conversion uses the end-of-training value."""
        t, old = t.float(), self.threshold
        # No Python branch on a tensor: a device sync every step (batchtopk under bf16, H200: 1.2x
        # with the topk above). t is inf when nothing fired: the average stays.
        new = torch.where(old < 0, t, decay * old + (1 - decay) * t)
        self.threshold.copy_(torch.where(t.isfinite(), new, old))

    # ---------------------------------------------------------------------------------------
    # losses

    def sparsity_loss(self, code: Code, kind: Literal["l1", "tanh"], c: float = TANH_C):
        """Per-token penalty on the contributions f_i * n_i: l1 = sum_i f_i n_i,
        tanh = sum_i tanh(c f_i n_i) (a smooth L0 proxy, Anthropic's April 2024 update)."""
        B = len(code.pre_BM)
        if code.f_BM is None:                            # sparse code: the nonzero pairs only
            a = code.vals * code.n_M[code.cols].to(code.vals.dtype)
            return (a if kind == "l1" else torch.tanh(c * a)).sum() / B
        if kind == "tanh" and c == TANH_C and code.tanh_sum is not None:
            return code.tanh_sum / B
        n_M = code.n_M.to(code.f_BM.dtype)
        if kind == "l1":
            return (code.f_BM @ n_M).mean()              # a matvec: one read of f
        return torch.tanh(code.f_BM * (c * n_M)).sum() / B          # (c * n: one (B, m) pass fewer)

    def pre_act_loss(self, code: Code):
        """JumpReLU's pre-activation loss sum_i ReLU(theta_i - h_i) n_i: it pulls latents that sit
        below their threshold up toward it. Written in contribution space, ReLU(theta_i - c_i),
        which is the same quantity with the threshold on h being theta_i / n_i."""
        return F.relu(self.log_threshold.exp() - code.c_BM).sum(-1).mean()

    def auxk_loss(self, code: Code, resid_BD: torch.Tensor, dead_M: torch.Tensor,
                  k_aux: int = 512) -> torch.Tensor:
        """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the top k_aux dead
        latents reconstruct the residual e = y - y_hat (detached), mean ||e - e_hat||^2.
        Only dead latents' encoder columns and decoder rows get a gradient."""
        if (n_dead := int(dead_M.sum())) == 0:
            return resid_BD.new_zeros(())
        k_aux, B = min(k_aux, n_dead), len(resid_BD)
        dead_idx = dead_M.nonzero().squeeze(1)                 # select among the dead columns only
        # where c_BM is a bf16 estimate, their exact c: a matmul over the dead columns costs less than
        # exact_pairs would, its candidates being most of them (the step at 32x, batch 1024, 5% dead:
        # 1.07x; more early in a run)
        c_BN = code.c_BM.detach()[:, dead_idx] if code.exact_cols is None else code.exact_cols(dead_idx)
        c, cols = row_topk(c_BN, k_aux)
        rows, cols = torch.arange(B, device=cols.device).repeat_interleave(k_aux), dead_idx[cols.flatten()]
        vals = F.relu(code.select(rows, cols, c.flatten()))    # f = relu(c) / n = relu(h)
        e_hat = SparseDecode.apply(vals, self.W_dec, rows, cols, B)
        return (resid_BD.detach() - e_hat).pow(2).sum(-1).mean()

    # ---------------------------------------------------------------------------------------
    # init, conversion, folding

    @torch.no_grad()
    def set_decoder_norm_(self, r: float):
        """Every decoder row to norm r and the encoder to the decoder's transpose again."""
        self.W_dec.mul_(r / self.W_dec.norm(dim=1, keepdim=True))
        if self.d_in == self.d_out:
            self.W_enc.copy_(self.W_dec.T)

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
        self.act_fn = "jumprelu"
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

    # ---------------------------------------------------------------------------------------
    # save / load: config.json + sae.safetensors in one folder

    def save(self, folder: str, extra: dict | None = None):
        """config.json + sae.safetensors, each written under a temporary name and renamed: a crash
        mid-save leaves the previous files, never a half-written one."""
        os.makedirs(folder, exist_ok=True)
        config, weights = os.path.join(folder, "config.json"), os.path.join(folder, "sae.safetensors")
        with open(weights + ".tmp", "wb") as f:   # (save_file makes it mode 0600, whatever the umask)
            f.write(save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}))
        with open(config + ".tmp", "w") as f:
            json.dump({**(extra or {}), "sae": self.config()}, f, indent=2)
        os.replace(weights + ".tmp", weights)
        os.replace(config + ".tmp", config)

    @staticmethod
    def load(folder: str, device: str | torch.device = "cpu") -> "SAE":
        for name in ("config.json", "sae.safetensors"):
            if not os.path.exists(os.path.join(folder, name)):
                raise FileNotFoundError(f"{folder} has no {name}: is it a folder that train.py saved?")
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)["sae"]
        state = load_file(os.path.join(folder, "sae.safetensors"), device=str(device))
        sae = SAE(**cfg, dtype=state["W_enc"].dtype, device=device)
        sae.load_state_dict(state)
        return sae.eval()        # for inference: a forward in train mode moves BatchTopK's threshold
