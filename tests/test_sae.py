"""The SAE's math on small random tensors: activation functions, gradients, decode, losses, init,
folding, conversion, save/load; and the fast paths held to the plain one (FAST off)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae as sae_module
from sae import REL, SAE, JumpReLU, PlainJumpReLU, estimate_c, largest_pairs, row_topk


def make(act_fn, d=16, m=64, k=4, **kw):
    torch.manual_seed(0)
    sae = SAE(d, m, act_fn, k, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_topk_has_exactly_k_per_token():
    sae = make("topk")
    x = torch.randn(32, 16)
    _, code = sae(x)
    assert (code.nnz_per_token() == 4).all()
    # the kept latents are the k largest contributions of each token
    c = sae.encode(x).c_BM
    dense = torch.zeros(32, 64).index_put_((code.rows, code.cols), code.vals)
    assert torch.equal((dense != 0), (c >= c.topk(4, dim=-1).values[:, -1:]))


def test_batchtopk_has_k_on_average_but_not_per_token():
    sae = make("batchtopk")
    x = torch.randn(64, 16) * torch.linspace(0.1, 3, 64)[:, None]   # busy and quiet tokens
    _, code = sae(x)
    nnz = code.nnz_per_token()
    assert nnz.sum() == 4 * 64
    assert nnz.max() > 4 and nnz.min() < 4
    assert sae.threshold > 0                                       # running threshold tracked


def test_batchtopk_running_threshold():
    """The first batch sets it to the smallest kept contribution, later ones move it by an EMA
    (decay 0.95), and a batch where nothing fires leaves it alone."""
    sae = make("batchtopk", m=256)
    x = torch.randn(32, 16)
    with torch.no_grad():
        b_enc = sae.b_enc.clone()
        sae.b_enc.fill_(-1e3)                                     # nothing fires
    sae(x)
    assert sae.threshold == -1
    with torch.no_grad():
        sae.b_enc.copy_(b_enc)
    t = []
    for scale in (1.0, 2.0):
        code = sae.encode(x * scale)
        t.append(code.c_BM[code.rows, code.cols][code.vals > 0].min())
    assert torch.allclose(sae.threshold, 0.95 * t[0] + 0.05 * t[1])
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    sae(x)
    assert torch.allclose(sae.threshold, 0.95 * t[0] + 0.05 * t[1])


@pytest.mark.parametrize("massive", [False, True])
def test_batchtopk_selects_exactly_the_k_b_largest_of_the_batch(massive):
    """The selection goes through a threshold sampled from the batch; it must equal a plain topk
    over all B*m contributions, also when one token (a massive activation) takes far more than 4k
    latents."""
    sae = make("batchtopk", m=256)
    x = torch.randn(32, 16) * torch.linspace(0.1, 3, 32)[:, None]
    if massive:
        x[5] *= 100
    code = sae.encode(x)
    c = sae.encode(x).c_BM.relu()
    ref = c.flatten().topk(4 * 32).indices
    got = code.rows * 256 + code.cols
    assert torch.equal(got.sort().values, ref.sort().values)
    assert (code.nnz_per_token()[5] > 16) == massive              # the big token took > 4k
    assert torch.equal(code.rows, code.rows.sort().values)         # bags together


@pytest.mark.parametrize("M", [256, 250])                  # 250: no groups of 8 columns
def test_largest_pairs_is_exact_when_the_sampled_threshold_misses(M):
    """largest_pairs estimates its threshold from every 61st value; where those lie (here, 30
    sampled values far above the rest) it must lower the threshold until it is exact."""
    torch.manual_seed(0)
    c = torch.randn(32, M)
    c.view(-1)[::61][:30] = 100.0
    rows, cols, vals = largest_pairs(c, 128)
    ref = c.flatten().topk(128).indices
    assert torch.equal((rows * M + cols).sort().values, ref.sort().values)
    assert torch.equal(c[rows, cols], vals)
    assert torch.equal(rows, rows.sort().values)


@pytest.mark.parametrize("M,k", [(64, 4), (1000, 8), (4096, 8)])       # (4096, 8): groups of groups
def test_row_topk_is_each_rows_k_largest(M, k):
    """row_topk (the k best groups of columns, then the k best of their values) selects what
    torch.topk does: k distinct columns per row whose values are the row's k largest, ties included."""
    torch.manual_seed(0)
    for c in (torch.randn(16, M), torch.randint(0, 20, (16, M)).float()):     # many ties
        vals, idx = row_topk(c, k)
        assert torch.equal(c.gather(1, idx), vals)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
        assert torch.equal(vals.sort(-1).values, c.topk(k, dim=-1).values.sort(-1).values)


def test_relu_and_jumprelu_forward():
    sae = make("relu")
    x = torch.randn(8, 16)
    code = sae.encode(x)
    assert torch.allclose(code.f_BM * code.n_M, torch.relu(code.c_BM))
    sae = make("jumprelu", jumprelu_init_threshold=0.5)
    code = sae.encode(x)
    a = code.f_BM * code.n_M
    assert torch.allclose(a, code.c_BM * (code.c_BM > 0.5), atol=1e-6)
    assert ((a == 0) | (a > 0.5)).all()


@pytest.mark.parametrize("blocked", [True, False])
def test_jumprelu_threshold_gradient_matches_formula(blocked):
    # The blocked JumpReLU (fast path) works on h with per-latent norms n, PlainJumpReLU on the
    # contribution c = h * n, where the formula is.
    h = torch.tensor([[0.05, 0.24, 0.52, 0.94], [0.55, -0.5, 0.23, 0.2]], requires_grad=True)
    n = torch.tensor([1.0, 2.0, 1.0, 0.5])
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    eps = 0.1
    f = JumpReLU.apply(h, n, theta, eps)[0] if blocked else PlainJumpReLU.apply(h * n, theta, eps) / n
    f.backward(g)
    c = h.detach() * n
    expected = torch.zeros(4)
    for b in range(2):
        for i in range(4):
            if abs(c[b, i] - theta[i]) < eps / 2 and c[b, i] > 0:
                expected[i] += g[b, i] / n[i] * (-theta[i] / eps)   # dL/da = dL/df / n
    assert torch.allclose(theta.grad, expected)
    assert (expected != 0).sum() >= 3                              # the window caught several
    same = torch.equal if blocked else torch.allclose            # (c / n: a rounding)
    assert same(f.detach(), h.detach() * (c > theta.detach()))
    assert same(h.grad, g * (c > theta.detach()))


@pytest.mark.parametrize("act_fn,penalty", [("relu", "l1"), ("relu", "tanh"), ("jumprelu", "tanh"),
                                            ("jumprelu", "l1")])
@pytest.mark.parametrize("path", ["dense", "sparse", "plain"])
def test_fast_paths_equal_straightforward_sae(act_fn, penalty, path, monkeypatch):
    """sae.py's fast paths compute relu / jumprelu on h (never building c = h * n), subtract b_dec
    through the bias, and once few latents fire switch to a sparse code with a sparse backward;
    the straightforward SAE of the README's formulas, written here by hand, must give the same
    outputs and the same gradients for every parameter, on both paths and on the plain one."""
    sparse = path == "sparse"
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32), 1.1 if sparse else 0.0)
    monkeypatch.setattr(sae_module, "FAST", path != "plain")
    monkeypatch.setattr(sae_module, "BLOCK", 5 * 64)   # dense JumpReLU: blocks of 5 rows, the last of 2
    sae = make(act_fn, jumprelu_init_threshold=0.3, jumprelu_threshold_window=0.5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)                    # unequal decoder norms
    x = torch.randn(32, 16)

    def grads(loss):
        sae.zero_grad()
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.log_threshold)]

    y_fast, code = sae(x)
    assert (code.f_BM is None) == sparse
    loss = (y_fast - x).pow(2).sum(-1).mean() + 0.1 * sae.sparsity_loss(code, penalty)
    if act_fn == "jumprelu":
        loss = loss + 0.1 * sae.pre_act_loss(code)
    g_fast = grads(loss)

    n = sae.W_dec.norm(dim=1)
    theta = sae.log_threshold.exp()
    c = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * n
    # JumpReLU written out: a = c H(c - theta), and a term that is zero but has the paper's
    # straight-through gradient to theta, -theta / eps in the window |c - theta| < eps / 2, c > 0
    a = torch.relu(c)
    if act_fn == "jumprelu":
        t = theta.detach()
        window = (((c - t).abs() < 0.25) & (c > 0)).float().detach()
        a = c * (c > t) + window * (-t / 0.5) * (theta - t)
    y_ref = (a / n) @ sae.W_dec + sae.b_dec
    pen = a.sum(-1) if penalty == "l1" else torch.tanh(4 * a).sum(-1)
    loss = (y_ref - x).pow(2).sum(-1).mean() + 0.1 * pen.mean()
    if act_fn == "jumprelu":
        loss = loss + 0.1 * torch.relu(theta - c).sum(-1).mean()
    g_ref = grads(loss)

    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    assert torch.allclose(code.dense(), a / n, atol=1e-5)
    # firing counts in one dtype on both paths: torchrun ranks sum them, each on its own path
    fired = code.fired(64)
    assert fired.dtype == torch.float32 and torch.equal(fired, (code.dense() > 0).sum(0).float())
    for name, gf, gr in zip(("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"), g_fast, g_ref):
        assert torch.allclose(gf, gr, atol=1e-5), name
    assert g_fast[0].abs().sum() > 0 and (act_fn == "relu" or g_fast[4].abs().sum() > 0)


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_sparse_and_dense_paths_agree_under_bf16_autocast(act_fn, monkeypatch):
    """Under bf16 autocast h is bf16 and the masks and bounds follow it; both paths must still
    give the same outputs and gradients (to bf16 precision). With no SPARSE_BELOW entry (a GPU
    under bf16) topk and batchtopk take the dense path too."""
    monkeypatch.setattr(sae_module, "BLOCK", 7 * 64)   # dense JumpReLU: blocks of 7 rows, the last of 1
    sae = make(act_fn, jumprelu_init_threshold=0.3, jumprelu_threshold_window=0.5)
    x = torch.randn(64, 16)
    results = []
    for share in (0.0, 1.1):                                # dense path, then sparse path
        monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.bfloat16), share)
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, code = sae(x)
            loss = (y.float() - x).pow(2).sum(-1).mean() + 0.1 * sae.sparsity_loss(code, "tanh")
        assert (code.f_BM is None) == (share > 1) and code.pre_BM.dtype == torch.bfloat16
        loss.backward()
        results.append([y.float()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                      for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.log_threshold)])
    for name, a, b in zip(("y", "W_enc", "W_dec", "b_enc", "log_threshold"), *results):
        assert (a - b).abs().max() <= 0.02 * a.abs().max() + 1e-6, name
    assert results[0][-1].abs().sum() > 0 or act_fn != "jumprelu"


def test_path_follows_the_device_and_the_autocast_dtype(monkeypatch):
    """SPARSE_BELOW is looked up by the device and the dtype the matmuls run in (autocast's):
    topk is sparse wherever there is an entry, dense where there is none (a GPU under bf16)."""
    sae, x = make("topk"), torch.randn(32, 16)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            assert sae(x)[1].f_BM is None
    monkeypatch.delitem(sae_module.SPARSE_BELOW, ("cpu", torch.float16))
    with torch.autocast("cpu", dtype=torch.float16):
        code = sae(x)[1]
    assert code.f_BM is not None and (code.nnz_per_token() == 4).all()


def test_dense_jumprelu_keeps_the_sae_dtype(monkeypatch):
    """JumpReLU widens bf16 blocks to fp32 on CPU; an fp64 SAE's f must stay exact in fp64."""
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float64), 0.0)
    torch.manual_seed(0)
    sae = SAE(16, 64, "jumprelu", 4, jumprelu_init_threshold=0.3, dtype=torch.float64)
    code = sae.encode(torch.randn(32, 16, dtype=torch.float64))
    h = code.pre_BM.detach()
    assert code.f_BM.dtype == torch.float64 and code.f_BM.any()
    assert torch.equal(code.f_BM.detach(), h * (h > (sae.log_threshold.exp() / code.n_M).double()))


@pytest.mark.parametrize("sparse", [False, True])
def test_jumprelu_steps_with_nothing_firing_and_with_no_tokens(sparse, monkeypatch):
    """JumpReLU's blocks when there is nothing to do: no pair fires or sits in the window (the
    sparse path then has no pairs at all), and a batch of no tokens. The step runs, and with
    nothing in the window the threshold's gradient is zero."""
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32), 1.1 if sparse else 0.0)
    sae = make("jumprelu", jumprelu_init_threshold=1e6)
    for x in (torch.randn(8, 16), torch.randn(0, 16)):
        sae.zero_grad()
        y, code = sae(x)
        assert (code.f_BM is None) == sparse and not code.dense().any()
        loss = (y - x).pow(2).sum() + (sae.sparsity_loss(code, "tanh") if len(x) else 0)
        loss.backward()
        assert sae.log_threshold.grad is not None and not sae.log_threshold.grad.any()
        assert torch.isfinite(sae.W_dec.grad).all() and torch.isfinite(sae.b_dec.grad).all()


def test_jumprelu_log_threshold_learns_through_the_sae():
    sae = make("jumprelu", jumprelu_init_threshold=0.3, jumprelu_threshold_window=1.0)
    y_hat, code = sae(torch.randn(64, 16))
    (sae.sparsity_loss(code, "tanh") + y_hat.pow(2).sum()).backward()
    assert sae.log_threshold.grad.abs().sum() > 0
    assert sae.log_threshold.dtype == torch.float32


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_sparse_decode_equals_dense_decode(act_fn):
    sae = make(act_fn)
    x = torch.randn(32, 16)
    y_sparse, code = sae(x)
    f = torch.zeros(32, 64).index_put_((code.rows, code.cols), code.vals, accumulate=True)
    y_dense = f @ sae.W_dec + sae.b_dec
    assert torch.allclose(y_sparse, y_dense, atol=1e-5)
    # and the gradients agree
    y_sparse.pow(2).sum().backward()
    g_sparse = sae.W_dec.grad.clone()
    sae.zero_grad()
    code = sae.encode(x)
    f = torch.zeros(32, 64).index_put_((code.rows, code.cols), code.vals, accumulate=True)
    (f @ sae.W_dec + sae.b_dec).pow(2).sum().backward()
    assert torch.allclose(g_sparse, sae.W_dec.grad, atol=1e-4)


def test_bias_trick_is_the_same_math():
    sae = make("relu")
    x = torch.randn(8, 16)
    h_ref = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert torch.allclose(sae.encode(x).c_BM, h_ref * sae.W_dec.norm(dim=1), atol=1e-5)


def test_transcoder_does_not_subtract_b_dec():
    torch.manual_seed(0)
    sae = SAE(16, 64, "relu", d_out=24, transcoder=True)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(8, 16)
    h_ref = x @ sae.W_enc.T + sae.b_enc
    assert torch.allclose(sae.encode(x).c_BM, h_ref * sae.W_dec.norm(dim=1), atol=1e-5)
    assert sae(x)[0].shape == (8, 24)


def test_an_sae_encoder_starts_as_its_decoder_and_a_transcoders_does_not():
    """W_enc = W_dec at init (and after the grid search's set_decoder_norm_) for an SAE only: a
    transcoder of equal widths reads another space, and its encoder keeps its own directions and
    norms (rows of norm ~1) whatever norm the decoder rows are set to."""
    torch.manual_seed(0)
    sae, tc = SAE(16, 64, "topk", 4), SAE(16, 64, "topk", 4, d_out=16, transcoder=True)
    for r in (None, 0.05):
        if r is not None:
            sae.set_decoder_norm_(r)
            tc.set_decoder_norm_(r)
        assert torch.equal(sae.W_enc, sae.W_dec)
        cos = torch.nn.functional.cosine_similarity(tc.W_enc, tc.W_dec, dim=1).abs()
        assert cos.max() < 0.9 and tc.W_enc.norm(dim=1).mean() > 0.8
    assert torch.allclose(tc.W_dec.norm(dim=1), torch.full((64,), 0.05))


def test_auxk_grad_only_reaches_dead_latents():
    sae = make("topk")
    x = torch.randn(32, 16)
    y_hat, code = sae(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 20, 41]] = True
    sae.auxk_loss(code, x - y_hat, dead, k_aux=2).backward()
    rows_with_grad = sae.W_dec.grad.abs().sum(1) > 0
    assert rows_with_grad.any()
    assert not rows_with_grad[~dead].any()
    assert not (sae.W_enc.grad.abs().sum(1) > 0)[~dead].any()


def test_auxk_matches_its_formula():
    """alpha-free AuxK: the top k_aux dead contributions of each token reconstruct the residual."""
    sae = make("topk")
    x = torch.randn(32, 16)
    y_hat, code = sae(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 20, 41, 50]] = True
    e = (x - y_hat).detach()
    c = torch.where(dead, code.c_BM, -torch.inf)
    idx = c.topk(3, dim=-1).indices
    f = torch.zeros(32, 64).scatter(-1, idx, torch.relu(code.c_BM.gather(-1, idx)) / code.n_M[idx])
    expected = (e - f @ sae.W_dec).pow(2).sum(-1).mean()
    assert torch.allclose(sae.auxk_loss(code, e, dead, k_aux=3), expected, rtol=1e-5)


def test_auxk_is_zero_with_no_dead_latents():
    sae = make("topk")
    y_hat, code = sae(torch.randn(4, 16))
    assert sae.auxk_loss(code, y_hat, torch.zeros(64, dtype=torch.bool)).item() == 0


def test_penalties_match_formulas(monkeypatch):
    sae = make("relu")
    code = sae.encode(torch.randn(8, 16))
    a = torch.relu(code.c_BM)
    assert torch.allclose(sae.sparsity_loss(code, "l1"), a.sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(sae.sparsity_loss(code, "tanh"), torch.tanh(4 * a).sum(-1).mean(), rtol=1e-5)
    sae = make("jumprelu", jumprelu_init_threshold=0.2)
    code = sae.encode(torch.randn(8, 16))
    expected = torch.relu(0.2 - code.c_BM).sum(-1).mean()
    assert torch.allclose(sae.pre_act_loss(code), expected, rtol=1e-5)
    # dense jumprelu: the tanh penalty comes with f when there is a gradient (JumpReLU, over blocks
    # of 3 rows), else sparsity_loss computes it from f
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32), 0.0)
    monkeypatch.setattr(sae_module, "BLOCK", 3 * 64)
    x = torch.randn(8, 16)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            code = sae.encode(x)
        assert (code.fast.tanh_sum is not None) == grad
        a = code.c_BM * (code.c_BM > 0.2)
        assert torch.allclose(sae.sparsity_loss(code, "tanh"), torch.tanh(4 * a).sum(-1).mean(), rtol=1e-5)


def test_grid_search_finds_the_known_best_norm():
    # With W_enc = W_dec, one latent per direction and x along a single decoder row, the
    # reconstruction of a ReLU SAE is (x . w) w, exact when ||w|| = 1 and worse otherwise.
    torch.manual_seed(0)
    sae = SAE(8, 8, "relu")
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(8))
        sae.W_enc.copy_(torch.eye(8))
    x = torch.rand(16, 8) + 0.1
    r = sae.grid_search_init_norm_(x, x)
    assert abs(r - 1.0) < 0.011
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((8,), r))


def test_grid_search_measures_at_the_k_it_is_given():
    # train.py passes the first step's k, initial_k under a k schedule, not top_k
    torch.manual_seed(0)
    x, at_2, at_16 = torch.randn(64, 16), SAE(16, 64, "topk", top_k=2), SAE(16, 64, "topk", top_k=16)
    at_16.load_state_dict(at_2.state_dict())
    r2 = at_2.grid_search_init_norm_(x, x)
    assert at_16.grid_search_init_norm_(x, x, k=2) == r2 != at_16.grid_search_init_norm_(x, x)


def test_folded_scales_give_the_same_output_on_raw_activations():
    for act_fn in ("relu", "jumprelu", "topk", "batchtopk"):
        sae = make(act_fn, jumprelu_init_threshold=0.05)
        sae.eval()
        x = torch.randn(32, 16) * 7.0 + 1.0
        s = 0.37
        y_norm, code_norm = sae(x * s)
        sae.fold_scales_(s, s)
        y_raw, code_raw = sae(x)
        assert torch.allclose(y_raw, y_norm / s, atol=1e-5), act_fn
        assert torch.equal(code_raw.nnz_per_token(), code_norm.nnz_per_token())


def test_batchtopk_converts_to_jumprelu():
    sae = make("batchtopk", d=16, m=128, k=8)
    torch.manual_seed(1)
    for _ in range(50):                                         # build the running threshold
        sae(torch.randn(256, 16))
    sae.eval()
    x = torch.randn(512, 16)
    y_b, code_b = sae(x)
    sae.to_jumprelu_()
    y_j, code_j = sae(x)
    assert sae.act_fn == "jumprelu"
    assert abs(code_j.nnz_per_token().mean() - 8) < 0.8   # L0 within 10% of k
    ev = 1 - (y_j - y_b).pow(2).sum() / (y_b - y_b.mean(0)).pow(2).sum()
    assert ev > 0.95


def test_save_load_round_trip(tmp_path):
    for act_fn in ("jumprelu", "batchtopk"):
        sae = make(act_fn)
        sae(torch.randn(64, 16))
        sae.eval()
        x = torch.randn(16, 16)
        before = sae(x)[0]
        sae.save(tmp_path / act_fn, {"note": 1})
        assert sorted(os.listdir(tmp_path / act_fn)) == ["config.json", "sae.safetensors"]
        umask = os.umask(0o022)
        os.umask(umask)                                     # readable as the umask says, like config.json
        assert os.stat(tmp_path / act_fn / "sae.safetensors").st_mode & 0o777 == 0o666 & ~umask
        loaded = SAE.load(tmp_path / act_fn)                # in eval mode: inference is what it is for
        assert loaded.act_fn == act_fn and loaded.top_k == 4
        assert torch.equal(loaded(x)[0], before)
        assert torch.equal(loaded.threshold, sae.threshold)  # the forward did not move it


def test_load_reads_a_folder_saved_with_the_previous_layout(tmp_path):
    """Before "format": 2, config.json had no marker and W_enc was saved (d_in, d_sae), with
    h = (x - b_dec) W_enc + b_enc. d_in == d_sae here, so only the marker can tell the layouts
    apart. Saved again, the SAE is in the current format and loads to the same outputs."""
    torch.manual_seed(0)
    d = 16
    W_enc_old, W_dec = torch.randn(d, d), torch.randn(d, d)
    b_enc, b_dec = torch.randn(d) * 0.1, torch.randn(d) * 0.1
    old = tmp_path / "old"
    old.mkdir()
    config = {"d_in": d, "d_sae": d, "act_fn": "relu", "top_k": 4, "d_out": d, "transcoder": False,
              "jumprelu_threshold_window": 0.1, "jumprelu_init_threshold": 0.1}
    (old / "config.json").write_text(json.dumps({"note": 1, "sae": config}))
    save_file({"W_dec": W_dec, "W_enc": W_enc_old, "b_enc": b_enc, "b_dec": b_dec,
               "log_threshold": torch.full((d,), math.log(0.1)), "threshold": torch.tensor(-1.0)},
              old / "sae.safetensors")
    sae = SAE.load(old)
    assert sae.W_enc.shape == (d, d) and sae.W_enc.is_contiguous()
    x = torch.randn(32, d)
    h = (x - b_dec) @ W_enc_old + b_enc
    y_hat, code = sae(x)
    assert torch.allclose(code.c_BM, h * W_dec.norm(dim=1), atol=1e-5)
    assert torch.allclose(y_hat, torch.relu(h) @ W_dec + b_dec, atol=1e-5)
    sae.save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["format"] == 2
    assert torch.equal(load_file(tmp_path / "new" / "sae.safetensors")["W_enc"], W_enc_old.T)
    assert torch.equal(SAE.load(tmp_path / "new")(x)[0], y_hat)


def test_param_groups_hold_every_parameter_once_with_the_thresholds_lr_factor():
    """As train.py takes them: fused Adam over the groups, each group's lr set to lr * lr_factor.
    The first Adam step moves every parameter with a gradient by about its group's lr."""
    sae = make("jumprelu", jumprelu_init_threshold=0.3, jumprelu_threshold_window=1.0)
    groups = sae.param_groups(0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(sae.parameters())) and {id(p) for p in params} == {id(p) for p in sae.parameters()}
    assert [g.get("lr_factor", 1.0) for g in groups] == [1.0, 0.1] and groups[1]["params"] == [sae.log_threshold]
    opt = torch.optim.Adam(groups, lr=1e-2, betas=(0.9, 0.999), fused=True)
    for group in opt.param_groups:
        group["lr"] = 1e-2 * group.get("lr_factor", 1.0)
    before = [p.detach().clone() for p in params]
    y_hat, code = sae(torch.randn(64, 16))
    ((y_hat - 1).pow(2).sum(-1).mean() + sae.sparsity_loss(code, "tanh")).backward()
    opt.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(params, before)]
    assert moved[:-1] == pytest.approx([1e-2] * 4, rel=0.01) and moved[-1] == pytest.approx(1e-3, rel=0.01)


def estimate_path(monkeypatch, path: str):
    """path "estimate" / "estimate int8": topk and batchtopk select on estimate_c's bf16 / int8
    estimate at any m, whatever this CPU would pick; any other path: never on an estimate."""
    monkeypatch.setattr(sae_module, "ESTIMATE_FROM", 0 if path.startswith("estimate") else math.inf)
    monkeypatch.setattr(sae_module, "ESTIMATE", "int8" if path == "estimate int8" else "bf16")


FAST_PATHS = [(act_fn, path) for act_fn in ("relu", "jumprelu") for path in ("dense", "sparse")] + \
             [(act_fn, path) for act_fn in ("topk", "batchtopk") for path in ("dense", "sparse", "estimate", "estimate int8")]


@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("act_fn,path", FAST_PATHS)
def test_fast_paths_give_the_plain_paths_outputs_and_gradients(act_fn, path, transcoder, monkeypatch):
    """With FAST off every act_fn runs the plain branch of SAE.encode. Each fast path must give the
    same y_hat, code, losses (both penalties and the pre-activation loss, or AuxK), BatchTopK
    threshold and gradient for every parameter; and every gradient contiguous, as W_enc is stored
    (d_sae, d_in) and DDP all-reduces them."""
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32), 0.0 if path == "dense" else 1.1)
    estimate_path(monkeypatch, path)
    monkeypatch.setattr(sae_module, "BLOCK", 5 * 64)        # dense JumpReLU: blocks of 5 rows
    torch.manual_seed(0)
    sae = SAE(16, 64, act_fn, 4, d_out=24 if transcoder else None, transcoder=transcoder,
              jumprelu_init_threshold=0.3, jumprelu_threshold_window=0.5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)                   # unequal decoder norms
    x = torch.randn(32, 16)
    y = torch.randn(32, 24) if transcoder else x
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def run(fast):
        monkeypatch.setattr(sae_module, "FAST", fast)
        sae.zero_grad(set_to_none=True)
        sae.threshold.fill_(-1.0)
        y_hat, code = sae(x)
        terms = [(y_hat - y).pow(2).sum(-1).mean()]
        if act_fn in ("relu", "jumprelu"):
            terms += [sae.sparsity_loss(code, "l1"), sae.sparsity_loss(code, "tanh")]
            terms += [sae.pre_act_loss(code)] * (act_fn == "jumprelu")
        else:
            terms.append(sae.auxk_loss(code, y - y_hat, dead, k_aux=5))
        sum(0.1 * t for t in terms).backward()
        for name, p in sae.named_parameters():
            assert p.grad is None or p.grad.is_contiguous(), name
        return code, [y_hat, code.dense(), *terms, sae.threshold.clone()], dict(sae.named_parameters())

    code, out_plain, params = run(False)
    g_plain = {n: p.grad for n, p in params.items()}
    assert code.fast is None and code.f_BM is not None
    code, out_fast, params = run(True)
    assert (code.f_BM is None) == (path != "dense") and code.fast.estimated == path.startswith("estimate")
    assert (code.dense() > 0).any() and not (code.dense() > 0).all()
    for i, (a, b) in enumerate(zip(out_fast, out_plain)):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-5), i
    for name, p in params.items():
        assert (p.grad is None) == (g_plain[name] is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, g_plain[name], atol=1e-5), name
    assert params["W_enc"].grad.abs().sum() > 0
    assert act_fn != "jumprelu" or params["log_threshold"].grad.abs().sum() > 0
    assert act_fn != "batchtopk" or out_fast[-1] > 0


def test_load_of_a_wrong_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SAE.load(tmp_path)
    # the config of one SAE beside the weights of another: one line naming the tensors that disagree
    SAE(16, 64, "topk", 4).save(str(tmp_path / "a"))
    SAE(16, 128, "topk", 4).save(str(tmp_path / "b"))
    os.replace(tmp_path / "b" / "sae.safetensors", tmp_path / "a" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"not one SAE's .*W_enc \(64, 16\) vs \(128, 16\)"):
        SAE.load(tmp_path / "a")


def dense_reference(sae, x, k, batch=False):
    """The straightforward TopK / BatchTopK SAE: dense code, plain autograd everywhere."""
    n = sae.W_dec.norm(dim=1)
    c = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * n
    a = torch.relu(c)
    if batch:
        keep = torch.zeros(a.numel(), dtype=torch.bool)
        keep[a.flatten().topk(k * len(x)).indices] = True
        keep = keep.view_as(a)
    else:
        keep = torch.zeros_like(a, dtype=torch.bool).scatter(1, a.topk(k, dim=-1).indices, True)
    f = a * keep / n
    return f @ sae.W_dec + sae.b_dec, f, c


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
@pytest.mark.parametrize("path", ["sparse", "dense", "estimate", "estimate int8", "plain"])
def test_topk_paths_match_dense_reference_forward_and_backward(act_fn, path, monkeypatch):
    """The sparse path (CPU), the dense one (where SPARSE_BELOW has no entry: GPU bf16), the
    sparse ones that select on a bf16 or int8 estimate of c (a CPU with AMX or VNNI, large m) and
    the plain one (FAST off), AuxK included, against the textbook dense SAE written here."""
    sparse = path == "sparse" or path.startswith("estimate")
    if path == "dense":
        monkeypatch.delitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32))
    monkeypatch.setattr(sae_module, "FAST", path != "plain")
    estimate_path(monkeypatch, path)
    sae = make(act_fn, d=24, m=96, k=6)
    x = torch.randn(40, 24)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True

    def loss_of(y_hat, aux):
        return (y_hat - x).pow(2).sum(-1).mean() + aux

    y_hat, code = sae(x)
    assert (code.f_BM is None) == sparse and (code.fast is None) == (path == "plain")
    assert (code.fast is not None and code.fast.estimated) == path.startswith("estimate")
    fast = loss_of(y_hat, sae.auxk_loss(code, x - y_hat, dead, k_aux=5))
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    y_ref, f, c = dense_reference(sae, x, 6, act_fn == "batchtopk")
    # AuxK by hand: the top 5 dead latents of each token reconstruct the detached residual
    a_dead = torch.where(dead, c, -torch.inf)
    keep = torch.zeros_like(c, dtype=torch.bool).scatter(1, a_dead.topk(5, dim=-1).indices, True)
    e_hat = (torch.relu(c) * keep / sae.W_dec.norm(dim=1)) @ sae.W_dec
    aux = ((x - y_ref).detach() - e_hat).pow(2).sum(-1).mean()
    ref = loss_of(y_ref, aux)
    ref.backward()
    assert torch.allclose(y_hat, y_ref, atol=1e-5)
    assert torch.allclose(code.dense(), f, atol=1e-5)      # the (B, m) code, whichever path
    assert torch.allclose(fast, ref, atol=1e-5)
    for name, g in g_fast.items():
        assert torch.allclose(g, sae.get_parameter(name).grad, atol=1e-5), name
    assert set(g_fast) == {"W_enc", "W_dec", "b_enc", "b_dec"}


@pytest.mark.parametrize("act_fn", ["topk", "relu", "topk estimate", "topk estimate int8"])
def test_transcoder_sparse_backward_matches_straightforward(act_fn, monkeypatch):
    """A transcoder's encoder has no b_dec term (SparseEncode gets no b_dec). Its sparse path, with
    x requiring a gradient too, must match plain autograd on the README's formulas."""
    monkeypatch.setitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32), 1.1)   # relu: sparse
    estimate_path(monkeypatch, act_fn.partition(" ")[2])
    act_fn = act_fn.split()[0]
    torch.manual_seed(0)
    sae = SAE(16, 64, act_fn, 4, d_out=24, transcoder=True)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x, y = torch.randn(32, 16, requires_grad=True), torch.randn(32, 24)
    wrt = (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, x)

    def grads(y_hat):
        for p in wrt:
            p.grad = None
        (y_hat - y).pow(2).sum(-1).mean().backward()
        return [p.grad.clone() for p in wrt]

    y_fast, code = sae(x)
    assert code.f_BM is None
    g_fast = grads(y_fast)
    n = sae.W_dec.norm(dim=1)
    c = (x @ sae.W_enc.T + sae.b_enc) * n
    a = torch.relu(c)
    if act_fn == "topk":
        a = a * torch.zeros_like(a, dtype=torch.bool).scatter(1, c.topk(4, dim=-1).indices, True)
    y_ref = (a / n) @ sae.W_dec + sae.b_dec
    g_ref = grads(y_ref)
    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    for name, gf, gr in zip(("W_enc", "W_dec", "b_enc", "b_dec", "x"), g_fast, g_ref):
        assert torch.allclose(gf, gr, atol=1e-5), name
    assert g_fast[-1].abs().sum() > 0


def estimate_inputs(M, massive=True):
    """An SAE with unequal decoder norms, a b_dec, and tokens with massive activations in two
    dimensions (as a residual stream has), for the bf16 estimate of c."""
    torch.manual_seed(0)
    sae = SAE(48, M, "topk", 8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(M, 1) + 0.5)
    x = torch.randn(256, 48)
    if massive:
        x[:, 3] += 40
        x[::5, 7] *= 50
    return sae, x


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_estimate_c_is_within_its_error_bound(kind):
    """estimate_c's bound |c - estimate| <= err_B + rel |estimate| holds for every pair, tokens with
    massive activations included; bf16: its matmul rounds its output once (what rel assumes), so the
    estimate is within 2^-8 of the exact c of the bf16-rounded inputs; int8: the bound is tight
    enough to be of use (within 10x the largest error)."""
    sae, x = estimate_inputs(512)
    n = sae.W_dec.norm(dim=1).detach()
    with torch.no_grad():
        est, err_B, rel = estimate_c(x - sae.b_dec, sae.W_enc, sae.b_enc, n, kind)
    W, b, xc = (sae.W_enc * n[:, None]).T.detach().double(), (sae.b_enc * n).detach().double(), (x - sae.b_dec).detach()
    c = xc.double() @ W + b
    assert est.dtype == (torch.bfloat16 if kind == "bf16" else torch.float32)
    est = est.double()
    assert ((c - est).abs() <= err_B.double()[:, None] + rel * est.abs()).all()
    assert (c - est).abs().max() > 1e-3 * c.abs().max()          # a real estimate, not exact
    if kind == "int8":
        assert rel < 1e-6 and err_B.max() < 10 * (c - est).abs().max()
    else:
        assert rel == REL
        c_rounded = xc.bfloat16().double() @ W.bfloat16().double() + b.bfloat16().double()
        slack = 48 * 2 ** -24 * (xc.abs().double() @ W.abs())       # fp32 accumulation
        assert ((c_rounded - est).abs() <= 2 ** -8 * c_rounded.abs() + slack).all()


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
@pytest.mark.parametrize("M", [512, 500])                  # 500: no groups of 8 columns
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_estimate_selects_what_fp32_selects(act_fn, M, kind, monkeypatch):
    """Selecting on the bf16 (int8) estimate, then on the exact c of every pair its bound leaves in
    doubt, gives the selection and the values of the fp32 path, also among latents whose c differ by
    far less than the estimate can tell apart (pairs of near-copies of encoder columns), where a
    selection on the estimate alone goes wrong."""
    sae, x = estimate_inputs(M)
    sae.act_fn = act_fn
    with torch.no_grad():
        sae.W_enc[1::2] = sae.W_enc[::2] * (1 + 1e-4 * torch.randn(M // 2, 1))
    codes = {}
    monkeypatch.setattr(sae_module, "ESTIMATE", kind)
    for path in ("fp32", "estimate"):
        monkeypatch.setattr(sae_module, "ESTIMATE_FROM", 0 if path == "estimate" else math.inf)
        with torch.no_grad():
            codes[path] = sae.encode(x)
    ref, est = codes["fp32"], codes["estimate"]
    assert not ref.fast.estimated and est.fast.estimated
    assert torch.equal(ref.dense() != 0, est.dense() != 0)
    assert torch.allclose(ref.dense(), est.dense(), rtol=1e-5, atol=1e-6)
    # the same selection made on the estimate alone differs
    c = est.c_BM.float()
    if act_fn == "topk":
        naive = torch.zeros_like(c, dtype=torch.bool).scatter(1, row_topk(c, 8)[1], True)
    else:
        naive = torch.zeros_like(c, dtype=torch.bool)
        naive.view(-1)[c.flatten().topk(8 * len(x)).indices] = True
    assert not torch.equal(naive, ref.dense() != 0)


def test_bf16_autocast_rounds_x_after_b_dec_takes_out_its_large_dimensions():
    # a few dimensions far larger than the rest, as in an LM's residual stream: rounded to bf16
    # before b_dec is subtracted, x would carry their rounding error into every h and c
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    x[:, 3] += 40
    x[:, 7] -= 25
    for act_fn in ("relu", "topk"):
        sae = SAE(64, 512, act_fn, 8)
        with torch.no_grad():
            sae.b_dec.copy_(x.mean(0))
        want = (x.double() - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
        if act_fn == "topk":
            want = want * sae.W_dec.double().norm(dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sae.encode(x).pre_BM
        assert (got.double() - want).abs().max() < 4 * 2 ** -8 * want.abs().max()


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_library_use_any_leading_shape_any_dtype_decode_of_edited_latents(act_fn):
    """As from a notebook: (batch, seq, d) activations in the LM's dtype give y_hat of that shape;
    decode takes the Code alone (its token count is its own) or edited latent activations f; the
    Code's helpers agree on the sparse and the dense path."""
    sae = make(act_fn, d=16, m=64, k=4).eval()
    x = torch.randn(3, 5, 16)
    y_hat, code = sae(x.bfloat16())
    y_flat, code_flat = sae(x.bfloat16().float().view(15, 16))
    assert y_hat.shape == (3, 5, 16) and y_hat.dtype == torch.float32
    assert torch.equal(y_hat.view(15, 16), y_flat)
    assert torch.allclose(sae.decode(code), y_flat) and torch.allclose(sae.decode(code.dense()), y_flat, atol=1e-5)
    f = code.dense().clone()
    f[:, 0] += 2.0                                   # steer along latent 0
    assert torch.allclose(sae.decode(f) - y_flat, 2.0 * sae.W_dec[0].expand(15, 16), atol=1e-5)
    nnz = code.nnz_per_token()
    assert nnz.dtype == torch.float32 and torch.equal(nnz, (code.dense() > 0).float().sum(-1))
    assert torch.equal(code.active(), (code.dense() > 0).float())
    for bad in (torch.randn(15, 15), torch.randn(16), torch.randn(5, 1)):
        if bad.shape[-1:] != (16,):
            with pytest.raises(ValueError, match="d_in = 16"):
                sae(bad)
    assert sae(torch.randn(16))[0].shape == (16,)      # one token, no batch dimension
    if act_fn in ("topk", "batchtopk"):
        for k in (0, 65):
            with pytest.raises(ValueError, match="1 <= k <= d_sae = 64"):
                sae(x, k)


# ---------------------------------------------------------------------------------------------
# Matryoshka BatchTopK, skip transcoders, checksums and failed writes


def matryoshka_reference(sae, code, x, y, sizes):
    """The Matryoshka loss as Bussmann et al. write it, brute force on the dense code: for each
    prefix m_j, ||y - (f[:, :m_j] W_dec[:m_j] + b_dec)||^2, averaged over tokens, summed over j."""
    f = code.dense()
    return sum((y - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in sizes)


@pytest.mark.parametrize("act_fn", ["batchtopk", "topk"])
@pytest.mark.parametrize("path", ["sparse", "dense", "estimate", "estimate int8", "plain"])
def test_matryoshka_loss_is_the_sum_over_prefixes_forward_and_backward(act_fn, path, monkeypatch):
    """reconstruction_loss of a Matryoshka SAE, AuxK beside it, on each path (the sparse code takes
    each prefix's pairs, the dense one its columns), against the formula on the dense code of the
    textbook SAE (dense_reference): the loss and the gradient of every parameter."""
    if path == "dense":
        monkeypatch.delitem(sae_module.SPARSE_BELOW, ("cpu", torch.float32))
    monkeypatch.setattr(sae_module, "FAST", path != "plain")
    estimate_path(monkeypatch, path)
    sae = make(act_fn, d=24, m=96, k=6, matryoshka_sizes=[6, 12, 24, 48])
    assert sae.matryoshka_sizes == [6, 12, 24, 48, 96]
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)                    # unequal decoder norms
    x = torch.randn(40, 24)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    y_hat, code = sae(x)
    assert (code.f_BM is None) == (path in ("sparse", "estimate", "estimate int8"))
    got = sae.reconstruction_loss(code, x, y_hat) + sae.auxk_loss(code, x - y_hat, dead, k_aux=5)
    got.backward()
    g_got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    y_ref, f, c = dense_reference(sae, x, 6, act_fn == "batchtopk")
    code_ref = sae_module.Code(f, None, None, None, c, sae.W_dec.norm(dim=1))
    ref = matryoshka_reference(sae, code_ref, x, x, [6, 12, 24, 48, 96])
    a_dead = torch.where(dead, c, -torch.inf)          # AuxK by hand, on the full reconstruction
    keep = torch.zeros_like(c, dtype=torch.bool).scatter(1, a_dead.topk(5, dim=-1).indices, True)
    e_hat = (torch.relu(c) * keep / sae.W_dec.norm(dim=1)) @ sae.W_dec
    (ref + ((x - y_ref).detach() - e_hat).pow(2).sum(-1).mean()).backward()
    assert torch.allclose(got, ref + ((x - y_ref) - e_hat).pow(2).sum(-1).mean(), rtol=1e-5)
    # the prefixes' errors differ from the whole's: the terms are not five copies of the MSE
    assert abs(ref - 5 * (x - y_ref).pow(2).sum(-1).mean()) > 0.05 * ref
    for name, g in g_got.items():
        assert torch.allclose(g, sae.get_parameter(name).grad, atol=1e-5), name
    assert set(g_got) == {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_matryoshka_settings_saved_checked_and_dropped_by_the_jumprelu_conversion(tmp_path):
    """The prefix sizes are a constructor argument: saved in config.json and loaded back; bad ones,
    or an act_fn without a selection to restrict, fail in one line. A plain SAE's reconstruction
    loss is the mean squared error. Converted to JumpReLU it is a plain per-token SAE."""
    sae = make("batchtopk", matryoshka_sizes=[8, 16, 32, 64])
    assert sae.matryoshka_sizes == [8, 16, 32, 64]
    for bad in ([16, 8], [0, 8], [8, 8], [8, 128]):
        with pytest.raises(ValueError, match="increase strictly"):
            SAE(16, 64, "batchtopk", 4, matryoshka_sizes=bad)
    with pytest.raises(ValueError, match="takes act_fn batchtopk or topk"):
        SAE(16, 64, "relu", 4, matryoshka_sizes=[8])
    sae(torch.randn(256, 16))                                        # a running threshold
    sae.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["sae"]["matryoshka_sizes"] == [8, 16, 32, 64]
    loaded = SAE.load(tmp_path / "m")
    assert loaded.matryoshka_sizes == [8, 16, 32, 64]
    x = torch.randn(32, 16)
    plain = make("batchtopk")
    y_hat, code = plain(x)
    assert torch.equal(plain.reconstruction_loss(code, x, y_hat), (y_hat - x).pow(2).sum(-1).mean())
    loaded.to_jumprelu_().save(tmp_path / "j")
    j = SAE.load(tmp_path / "j")
    assert j.act_fn == "jumprelu" and j.matryoshka_sizes is None
    y_hat, code = j(x)
    y_5, code_5 = j(x[:5])                                           # per token: no batch-mates
    assert torch.allclose(y_5, y_hat[:5], atol=1e-5) and torch.equal(code_5.dense() > 0, code.dense()[:5] > 0)
    assert torch.equal(j.reconstruction_loss(code, x, y_hat), (y_hat - x).pow(2).sum(-1).mean())


def skip_transcoder(**kw):
    torch.manual_seed(0)
    sae = SAE(16, 64, kw.pop("act_fn", "topk"), 4, d_out=24, transcoder=True, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("fast", [True, False])
def test_skip_transcoder_starts_as_the_plain_one_and_learns_its_map(fast, monkeypatch):
    """W_skip (d_out, d_in) starts at zero: the skip transcoder's output, loss and gradients are the
    plain transcoder's; W_skip's gradient is that of y_hat + x W_skip^T; and it is trained
    (param_groups), rejected for an SAE."""
    monkeypatch.setattr(sae_module, "FAST", fast)
    skip, plain = skip_transcoder(skip_connection=True), skip_transcoder()
    assert skip.W_skip.shape == (24, 16) and not skip.W_skip.any() and "W_skip" not in dict(plain.named_parameters())
    assert any(p is skip.W_skip for g in skip.param_groups(0.1) for p in g["params"])
    x, y = torch.randn(32, 16), torch.randn(32, 24)
    losses = []
    for sae in (skip, plain):
        y_hat, code = sae(x)
        losses.append(sae.reconstruction_loss(code, y, y_hat))
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    for name, p in plain.named_parameters():
        assert torch.equal(skip.get_parameter(name).grad, p.grad) if p.grad is not None else True, name
    y_hat = plain(x)[0].detach()
    assert torch.allclose(skip.W_skip.grad, (2 * (y_hat - y) / 32).T @ x, atol=1e-5)
    with torch.no_grad():
        skip.W_skip.normal_()
    assert torch.allclose(skip(x)[0], y_hat + x @ skip.W_skip.T, atol=1e-5)
    assert skip(x.view(4, 8, 16))[0].shape == (4, 8, 24)
    with pytest.raises(ValueError, match="skip_connection is for a transcoder"):
        SAE(16, 64, "topk", 4, skip_connection=True)


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_skip_transcoder_folds_its_scales_and_saves(act_fn, tmp_path):
    """Trained on x s_in -> y s_out, the folded skip transcoder on raw x gives the unfolded one's
    output on scaled x, divided by s_out (W_skip scales by s_in / s_out); and it saves and loads to
    the same outputs."""
    sae = skip_transcoder(act_fn=act_fn, skip_connection=True, jumprelu_init_threshold=0.05)
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.3)
    sae(torch.randn(64, 16))                             # batchtopk: a running threshold
    sae.eval()
    x, s_in, s_out = torch.randn(32, 16) * 7.0 + 1.0, 0.37, 2.9
    y_scaled, code_scaled = sae(x * s_in)
    sae.fold_scales_(s_in, s_out)
    y_raw, code_raw = sae(x)
    assert torch.allclose(y_raw, y_scaled / s_out, atol=1e-5)
    assert torch.equal(code_raw.nnz_per_token(), code_scaled.nnz_per_token())
    sae.save(tmp_path / "s")
    loaded = SAE.load(tmp_path / "s")
    assert loaded.skip_connection and torch.equal(loaded.W_skip, sae.W_skip)
    assert torch.equal(loaded(x)[0], y_raw)


def test_load_checks_the_weights_against_the_checksum_in_config(tmp_path):
    """config.json records the sha256 of sae.safetensors: another SAE's weights of the same shapes,
    or a file cut short, fail in one line; a folder saved before checksums loads unchecked."""
    make("topk").save(tmp_path / "a")
    torch.manual_seed(1)
    SAE(16, 64, "topk", 4).save(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(config["sha256"]) == 64
    data = (tmp_path / "a" / "sae.safetensors").read_bytes()
    os.replace(tmp_path / "b" / "sae.safetensors", tmp_path / "a" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"not the file saved with its config.json \(sha256 [0-9a-f]{12}\.\.\., "
                                         r"recorded [0-9a-f]{12}\.\.\.\): another SAE's weights"):
        SAE.load(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="unreadable .*cut short or damaged, its sha256 is not the one"):
        SAE.load(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").write_bytes(data)
    assert torch.equal(SAE.load(tmp_path / "a").W_enc, make("topk").W_enc)
    del config["sha256"]                 # a folder saved before checksums: nothing to check against
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    assert torch.equal(SAE.load(tmp_path / "a").W_enc, make("topk").W_enc)


def test_a_failed_save_raises_one_line_and_leaves_no_partial_file(tmp_path):
    """A real failed write: a child process under a file-size limit smaller than the weights (the
    write fails with EFBIG; SIGXFSZ, which would kill it, ignored). One line names the file; no
    partial or temporary file is left, and the folder's earlier files are intact."""
    import subprocess
    import sys
    make("topk", m=4096).save(tmp_path)                     # an earlier save, ~0.5 MB of weights
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code = ("import resource, signal, sys, torch; sys.path.insert(0, '.'); from sae import SAE, SaveError\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))\n"
            "try:\n    SAE(16, 4096, 'topk', 4).save(sys.argv[1])\n"
            "except SaveError as e:\n    print(e); sys.exit(3)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    weights = tmp_path / "sae.safetensors"
    assert r.stdout.strip() == f"cannot write {weights}: file too large (its partial file is removed)"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
