"""analyze.py: the streaming statistics against a brute-force pass over every token, the files and
load_features, a BatchTopK SAE through its JumpReLU conversion, bad input in one line, and the
page in a real browser."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import activations as acts
import analyze
from sae import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = "blocks.1.hook_resid_post"


def contexts_of(tokenizer, n: int, size: int = 32):
    texts = lambda: acts.iter_texts(acts.EMBEDDED_DATASET)                 # noqa: E731
    return [c for _, c in acts.iter_contexts(texts, tokenizer, size, held_out=n, eval=True)]


def brute_force(model, sae, contexts, drop_ids):
    """f (contexts, T, m) of every token at once, zero at the special tokens."""
    tokens = torch.stack(contexts)
    x = acts.run_hooks(model, tokens, [HOOK])[0]
    f = sae.encode(x.flatten(0, 1)).dense().view(*tokens.shape, -1)
    return f * ~torch.isin(tokens, drop_ids)[..., None]


@pytest.mark.parametrize("act_fn", ["relu", "topk"])
def test_streaming_top_contexts_and_frequencies_match_brute_force(tiny_model, act_fn):
    torch.manual_seed(0)
    sae = SAE(32, 64, act_fn, top_k=4).eval()
    drop_ids = acts.special_token_ids(tiny_model.tokenizer)
    contexts = contexts_of(tiny_model.tokenizer, 12)
    # Dressed as documents: EOS and pad in the middle of the text (BOS already starts each context).
    contexts[3][10], contexts[5][20] = tiny_model.tokenizer.eos_token_id, tiny_model.tokenizer.pad_token_id
    got = analyze.collect(tiny_model, sae, contexts, HOOK, drop_ids, top=20, samples=5, window=4, batch=3)
    f = brute_force(tiny_model, sae, contexts, drop_ids)                  # (C, T, m)
    f_NM = f.flatten(0, 1)
    assert got["tokens"] == int((~torch.isin(torch.stack(contexts), drop_ids)).sum())
    torch.testing.assert_close(got["count"].float(), (f_NM > 0).sum(0).float())
    torch.testing.assert_close(got["max"], f_NM.max(0).values)
    T = contexts[0].numel()
    for i in range(sae.d_sae):
        v = f_NM[:, i].sort(descending=True).values
        n = min(20, int((v > 0).sum()))
        top = got["top"]
        assert int((top["score"][i] > -torch.inf).sum()) == n
        torch.testing.assert_close(top["score"][i, :n], v[:n])
        # the same tokens (ties aside: a token right after BOS has one activation wherever it is)
        torch.testing.assert_close(f[top["context"][i, :n], top["pos"][i, :n], i], v[:n])
        assert len(set(zip(top["context"][i, :n].tolist(), top["pos"][i, :n].tolist()))) == n
        # the window: the context's tokens and this latent's activations around the peak
        for k in range(n):
            c, p = int(top["context"][i, k]), int(top["pos"][i, k])
            for j, o in enumerate(range(-4, 5)):
                if 0 <= p + o < T:
                    assert top["ids"][i, k, j] == contexts[c][p + o]
                    torch.testing.assert_close(top["acts"][i, k, j], f[c, p + o, i])
                else:
                    assert top["ids"][i, k, j] == -1 and top["acts"][i, k, j].isnan()
        # samples: firing tokens within 10-50% of the latent's final max
        s = got["samples"]
        ok = s["score"][i] > -torch.inf
        vals = f[s["context"][i][ok], s["pos"][i][ok], i]
        assert (vals > 0).all() and (vals <= 0.5 * got["max"][i] + 1e-6).all()
    # special tokens never fire
    for store in (got["top"], got["samples"]):
        ok = store["score"] > -torch.inf
        fired = torch.stack(contexts)[store["context"][ok], store["pos"][ok]]
        assert not torch.isin(fired, drop_ids).any()


def save_run(folder, tiny_model_path, sae, **train):
    """An SAE folder as train.py writes it: the run's config under "train"."""
    run = {"model": tiny_model_path, "hook_point_in": HOOK, "hook_point_out": None, "dataset": "data/austen",
           "dataset_split": "train", "text_column": "text", "context_size": 32, "eval_tokens": 256,
           "eval_dataset": None, "model_dtype": "float32", "ignore_token_ids": [], "max_norm_ratio": None,
           "act_fn": sae.act_fn, **train}
    sae.save(str(folder), {"train": run})
    return str(folder)


def test_analyze_writes_the_files_and_load_features_reads_them(tmp_path, tiny_model_path, tiny_model):
    torch.manual_seed(1)
    sae = SAE(32, 300, "topk", top_k=4)              # two shards of 256 latents
    folder = save_run(tmp_path / "sae", tiny_model_path, sae)
    out = analyze.main(analyze.Config(folder, batch_contexts=3))
    assert sorted(os.listdir(out)) == ["density.png", "index.html", "latents_00000.js", "latents_00001.js",
                                       "summary.js", "tokens.js"]
    everything = analyze.load_features(folder)
    meta = everything["meta"]
    assert meta["tokens"] == 8 * 31 and meta["d_sae"] == 300 and meta["logit_lens"]
    tokenizer = tiny_model.tokenizer
    contexts = contexts_of(tokenizer, 8)              # the run's held-out text: its first 256 tokens
    rec = analyze.load_features(folder, 257)
    assert rec == everything["latents"][257] and rec["latent"] == 257
    records = [r for r in everything["latents"] if r["top"]]
    assert len(records) > 200
    for r in records[:40]:
        assert len(r["top"]) <= 20 and len(r["promoted"]) == len(r["suppressed"]) == 10
        assert [c["act"] for c in r["top"]] == sorted((c["act"] for c in r["top"]), reverse=True)
        assert r["top"][0]["act"] == r["max"] and 0 < r["freq"] <= 1
        for c in r["top"] + r["samples"]:
            lo = c["pos"] - c["at"]
            ids = contexts[c["context"]][lo:lo + len(c["ids"])].tolist()
            assert c["ids"] == ids and c["acts"][c["at"]] == c["act"] and c["act"] > 0
            assert "".join(c["text"]) == tokenizer.decode(ids)      # the page's text is the document's
            assert c["ids"][c["at"]] not in (tokenizer.bos_token_id, tokenizer.eos_token_id)
    # the logit lens: the decoder direction through the final norm's weight and the unembedding
    W_U = tiny_model.original_model.get_output_embeddings().weight
    logits = (sae.W_dec[5] * tiny_model.ln_final.original_component.weight) @ W_U.T
    assert [t for t, _ in analyze.load_features(folder, 5)["promoted"]] == logits.topk(10).indices.tolist()


def test_batchtopk_is_analysed_through_its_jumprelu_conversion(tmp_path, tiny_model_path):
    torch.manual_seed(2)
    sae = SAE(32, 64, "batchtopk", top_k=4)
    sae.threshold.fill_(0.3)
    folder = save_run(tmp_path / "sae", tiny_model_path, sae)
    p = analyze.plan(analyze.Config(folder))          # no jumprelu/ folder: converted on load
    assert p["sae"].act_fn == "jumprelu" and torch.allclose(p["sae"].log_threshold.exp(), torch.tensor(0.3))
    conv = SAE.load(folder).to_jumprelu_()
    with torch.no_grad():
        conv.log_threshold.fill_(-1.0)                # train.py's jumprelu/ folder is the one used
    conv.save(os.path.join(folder, "jumprelu"))
    p = analyze.plan(analyze.Config(folder))
    assert p["sae"].act_fn == "jumprelu" and (p["sae"].log_threshold == -1.0).all()
    assert p["n_contexts"] == 8 and p["dataset"] == "data/austen"
    # end to end, as a transcoder into a norm's output: no logit lens there (not the residual stream)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["train"]["hook_point_out"] = "blocks.1.ln2.hook_normalized"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    analyze.main(analyze.Config(folder, tokens=128))
    rec = analyze.load_features(folder, 3)
    assert "promoted" not in rec and not analyze.load_features(folder)["meta"]["logit_lens"]
    assert analyze.load_features(folder)["meta"]["act_fn"] == "jumprelu"


def test_bad_input_is_one_line_before_the_model_loads(tmp_path, tiny_model_path):
    def error(*args):
        r = subprocess.run([sys.executable, "analyze.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        return r.stderr
    assert "no such folder" in error(str(tmp_path / "missing"))
    folder = save_run(tmp_path / "sae", tiny_model_path, SAE(32, 64, "topk", top_k=4))
    assert "held out only 256 tokens" in error(folder, "--tokens", "100000")
    other = save_run(tmp_path / "other", acts.EMBEDDED_MODEL, SAE(32, 64, "topk", top_k=4),
                     hook_point_in="blocks.5.hook_resid_post")
    assert "trained on another model" in error(other)        # 32 wide, SmolLM2's 576: from the config
    assert "holds only" in error(folder, "--dataset", str(make_text(tmp_path)), "--tokens", "5000")


def make_text(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text("A short text. " * 40)
    return d


def test_page_renders_in_a_browser(tmp_path, tiny_model_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium: apt-get install chromium")
    torch.manual_seed(3)
    folder = save_run(tmp_path / "sae", tiny_model_path, SAE(32, 64, "topk", top_k=4))
    out = analyze.main(analyze.Config(folder, batch_contexts=4))
    rec = analyze.load_features(folder, 7)
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                        "--virtual-time-budget=5000",
                        "--dump-dom", f"file://{os.path.abspath(out)}/index.html#7"],
                       capture_output=True, text=True, timeout=60)
    dom = r.stdout.split("<script")[0]                # the rendered page, not the page's own code
    assert 'id="latent">Latent #7<' in dom, r.stderr[-2000:]
    assert 30 <= dom.count('class="row g') < 64     # the rows in view, not all 64 latents
    assert dom.count('class="ctx"') == len(rec["top"]) + len(rec["samples"])
    shaded = 'class="t at" style="background:rgba(255,110,0,1.00)"'
    assert shaded in dom                                             # the peak token, fully shaded
    assert "logit-lens reading" in dom and dom.count('class="tk up"') == 10
