"""bench.py as the README runs it, in its --quick form: every section runs to the end, the summary
holds every ratio, and --markdown writes the same under the machine's description. No speed is
asserted: bench.py measures speed, tests do not. And the one-way imports: bench.py needs only
sae.py and activations.py (train.py runs as a process of its own), a test of sae.py only sae.py."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"relu", "jumprelu", "topk", "batchtopk", "relu fresh", "jumprelu fresh"}


def ratios(summary: str, head: str) -> dict:
    """{step: ratio} of the summary line that starts with head."""
    line = next(line for line in summary.splitlines() if line.startswith(head))
    return {step: float(v) for step, v in re.findall(r"(\w+(?: fresh)?) (\d+\.\d+)x", line[len(head):])}


def test_bench_quick_runs_every_section_and_writes_markdown(tmp_path, tiny_model_path):
    md = tmp_path / "BENCHMARKS.md"
    kept = "\n## Ablations\n\nrecorded by hand: kept\n"
    md.write_text("# nanoSAE benchmarks\n\n- CPU: a stale one\n\n## 1. matmul roofline\n\nstale\n" + kept)
    # No time limit worth the name: how long the bench takes is the machine's business (a busy CPU
    # without native bf16 is many times slower than a quiet one with it). This only stops a hang.
    # The LM sections run the tiny random model: what is checked here is the code, not the speed.
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--markdown", str(md), "--model", tiny_model_path,
                        "--hook", "blocks.1.hook_resid_post"], cwd=ROOT,
                       capture_output=True, text=True, timeout=4 * 3600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    dtypes = re.search(r"^dtypes timed: ([\w, ]+?)(?: \(|$)", r.stdout, re.M).group(1).split(", ")
    assert dtypes in (["fp32"], ["fp32", "bf16"]), r.stdout[:2000]
    summary = r.stdout.split("== summary ==\n")[1].split("total wall time")[0]
    for dt in dtypes:
        got = ratios(summary, f"nanoSAE/dense, expansion 8 {dt}:")
        assert set(got) == STEPS and all(v > 0 for v in got.values()), summary
        got = ratios(summary, f"nanoSAE/plain dense step of the same act_fn, expansion 8 {dt}:")
        assert set(got) == STEPS - {"topk", "batchtopk"}, summary
    if "bf16" in dtypes:
        assert set(ratios(summary, "nanoSAE bf16/fp32, expansion 8:")) == STEPS, summary
        assert re.search(r"matmul bf16/fp32: m=2048 \d+\.\d+x", summary), summary
    bound = ", ".join(rf"{dt} \d+\.\d+x" for dt in dtypes)
    assert re.search(rf"encoder matmul alone at the roofline/dense, expansion 8: {bound}; "
                     r"of it, fp32: topk \d+%, batchtopk \d+%", summary), summary
    assert re.search("bridge/raw HF: " + ", ".join(rf"{dt} \d+\.\d+x" for dt in dtypes), summary), summary
    assert re.search(r"train.py end-to-end: streaming [\d,]+ tokens/s, cached [\d,]+ tokens/s, cached/streaming "
                     r"\d+\.\d+x; held-out evaluation \(--eval-only process, LM load included\) [\d,]+ tokens/s",
                     summary), summary
    assert re.search(r"streaming reaches \d+% of 1 / \(1/LM \+ 1/cached\)", summary), summary
    assert re.search(r"analyze.py: analysis/LM forward of the same tokens \d+\.\d+x", summary), summary
    assert re.search(r"sweep/single runs, wall time of the same SAEs: \d+\.\d+x; training time: \d+\.\d+x$", summary, re.M), summary
    assert re.search(r"held-out EV typical, nanoSAE - plain topk: topk k=16 [+-]\d\.\d{4}, batchtopk k=16 "
                     r"[+-]\d\.\d{4}$", summary, re.M), summary
    # section 7's SAEs learned on the tiny model's activations: a fresh one (b_dec at the mean,
    # random rows) explains about none of the variance
    quality = dict((name, float(ev)) for name, ev in re.findall(r"^ *(topk|batchtopk|plain topk) +16 +(-?\d\.\d+) ",
                                                                 r.stdout, re.M))
    assert set(quality) == {"topk", "batchtopk", "plain topk"} and min(quality.values()) > 0.3, r.stdout[-3000:]

    # The Markdown file: the machine first, then every section's table and the same summary.
    text = md.read_text()
    assert "stale" not in text and text.endswith("\n" + kept), text[-500:]     # rewritten, but for the ablations
    header, body = text.split("\n## ", 1)
    assert header.startswith("# nanoSAE benchmarks\n")
    for item in ("- CPU: ", "- CPU native bf16: ", "torch CPU capability ", "- GPU: ", "; torch ", "- date: ",
                 "- command: python bench.py --quick --markdown ", "- load average at the start: ",
                 "- dtypes timed: ", "- LM of sections 3-7: "):
        assert item in header, (item, header)
    for title, columns in (("1. matmul roofline", "| shape | fp32 GFLOP/s |"),
                           ("2. SAE training step", "| step | expansion | dtype | L0 | tokens/s |"),
                           ("3. activation generation", "| dtype | bridge tokens/s | raw HF tokens/s |"),
                           ("4. end-to-end train.py", "| process | tokens/s | process wall s |"),
                           ("7. quality", "| SAE | k | EV | EV typical | L0 | dead | CE recovered |")):
        section = body.split(title, 1)[1].split("\n## ", 1)[0]
        assert columns in section and "|---|---:|" in section, (title, section)
        assert re.search(r"^\| .+ \| [\d,.]+x? \|", section, re.M), (title, section)      # rows of figures
    assert body.split("## Summary\n\n", 1)[1].startswith("\n".join(f"- {line}" for line in summary.splitlines()))


def local_imports(path: str, seen: set | None = None) -> set[str]:
    """The modules a file imports, anywhere in it (a function's lazy import too), and through the
    ones that are files of this repository, theirs: the whole set it pulls in."""
    seen = set() if seen is None else seen
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in (n.split(".")[0] for n in names):
            if name not in seen:
                seen.add(name)
                if os.path.exists(os.path.join(ROOT, f"{name}.py")):
                    local_imports(os.path.join(ROOT, f"{name}.py"), seen)
    return seen


def test_bench_imports_only_sae_and_activations():
    ours = {name for name in local_imports(os.path.join(ROOT, "bench.py"))
            if os.path.exists(os.path.join(ROOT, f"{name}.py"))}
    assert ours == {"sae", "activations"}, ours
    # train.py only as a process: no loading it by its path either
    with open(os.path.join(ROOT, "bench.py")) as f:
        source = f.read()
    assert not re.search(r"\b(importlib|runpy|__import__)\b", source)
    assert re.search(r'\[sys\.executable, "train\.py"', source)


def test_sae_tests_import_neither_bench_nor_train():
    imported = local_imports(os.path.join(ROOT, "tests", "test_sae.py"))
    assert "sae" in imported and not {"bench", "train"} & imported, imported
