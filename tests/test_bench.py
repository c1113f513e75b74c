"""bench.py as the README runs it, in its --quick form: every section runs to the end and the
summary holds every ratio. No speed is asserted: bench.py measures speed, tests do not."""
import os
import re
import subprocess
import sys

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
    assert re.search(r"encoder matmul alone at the roofline/dense, expansion 8: fp32 \d+\.\d+x, bf16 \d+\.\d+x; "
                     r"of it, fp32: topk \d+%, batchtopk \d+%", summary), summary
    assert re.search(r"bridge/raw HF: fp32 \d+\.\d+x, bf16 \d+\.\d+x", summary), summary
    assert re.search(r"train.py end-to-end: streaming [\d,]+ tokens/s, cached [\d,]+ tokens/s", summary), summary
