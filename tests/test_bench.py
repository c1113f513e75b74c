"""bench.py as the README runs it, in its --quick form: every section runs to the end and the
summary holds every ratio. No speed is asserted: bench.py measures speed, tests do not."""
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"relu", "jumprelu", "topk", "batchtopk", "relu fresh", "jumprelu fresh"}


def test_bench_quick_runs_every_section_and_prints_the_summary():
    r = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = r.stdout.split("== summary ==")[1]
    for head in ("nanoSAE/dense, expansion 8 fp32:", "nanoSAE/dense, expansion 8 bf16:",
                 "nanoSAE bf16/fp32, expansion 8:"):
        line = next(line for line in summary.splitlines() if line.startswith(head))
        ratios = dict(re.findall(r"(\w+(?: fresh)?) (\d+\.\d+)x", line[len(head):]))
        assert set(ratios) == STEPS and all(float(v) > 0 for v in ratios.values()), line
    for dt in ("fp32", "bf16"):
        head = f"nanoSAE/plain dense step of the same act_fn, expansion 8 {dt}:"
        line = next(line for line in summary.splitlines() if line.startswith(head))
        ratios = dict(re.findall(r"(\w+(?: fresh)?) (\d+\.\d+)x", line[len(head):]))
        assert set(ratios) == {"relu", "jumprelu", "relu fresh", "jumprelu fresh"}, line
    assert re.search(r"encoder matmul alone at the roofline/dense, expansion 8: fp32 \d+\.\d+x, bf16 \d+\.\d+x; "
                     r"of it, fp32: topk \d+%, batchtopk \d+%", summary), summary
    assert re.search(r"bridge/raw HF: fp32 \d+\.\d+x, bf16 \d+\.\d+x", summary), summary
    assert re.search(r"train.py end-to-end: streaming [\d,]+ tokens/s, cached [\d,]+ tokens/s", summary), summary


def test_plain_jumprelu_reference_is_the_same_math_as_sae_jumprelu():
    """bench.py's like-for-like reference for jumprelu: with unit decoder norms (c = h), its f, its
    gradient to h and its straight-through gradient to theta equal sae.py's JumpReLU's."""
    sys.path.insert(0, ROOT)
    from bench import PlainJumpReLU
    from sae import JumpReLU
    torch.manual_seed(0)
    h = torch.randn(64, 48, dtype=torch.float64)
    theta = torch.rand(48, dtype=torch.float64) * 0.5 + 0.1          # > eps / 2: c > 0 in the window
    g = torch.randn(64, 48, dtype=torch.float64)
    out = []
    for fn in (lambda h, t: PlainJumpReLU.apply(h, t, 0.1),
               lambda h, t: JumpReLU.apply(h, torch.ones(48, dtype=torch.float64), t, 0.1)[0]):
        h_, t_ = h.clone().requires_grad_(), theta.clone().requires_grad_()
        f = fn(h_, t_)
        f.backward(g)
        out.append((f, h_.grad, t_.grad))
    assert (out[0][0] != 0).any() and (out[0][2] != 0).any()       # some fire, some sit in the window
    for a, b in zip(*out):
        assert torch.allclose(a, b)
