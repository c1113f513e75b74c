"""Downstream evaluation: the LM with the SAE's reconstruction spliced in."""
import json
import os
import subprocess
import sys

import pytest
import torch

import activations as acts
import train
from sae import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def identity_sae(d: int) -> SAE:
    """A ReLU SAE that reconstructs exactly: latents +e_i and -e_i, x = relu(x) - relu(-x)."""
    sae = SAE(d, 2 * d, "relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 0))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae


def tiny_cfg(path, hook="blocks.1.hook_resid_post", **kw):
    return train.Config(model=path, model_dtype="float32", hook_point_in=hook,
                        context_size=32, eval_tokens=512, model_batch_contexts=4, **kw)


# attn.hook_z is per head, (B, T, 4 heads, 8): the SAE sees one 32-vector per token
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"])
def test_splicing_the_activation_itself_changes_nothing(tiny_model, tiny_model_path, hook):
    cfg = tiny_cfg(tiny_model_path, hook)
    assert acts.hook_dims(tiny_model, [hook, hook]) == [32, 32]
    drop = acts.special_token_ids(tiny_model.tokenizer)
    r = train.evaluate(identity_sae(32), tiny_model, cfg, drop, "cpu")
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert r["explained_variance_typical"] == pytest.approx(1.0, abs=1e-6)
    assert r["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_loss_zero"] != pytest.approx(r["ce_loss_clean"])   # the splice point matters
    assert r["predicted_tokens"] == 16 * 31


def test_splice_matches_a_hand_built_reference(tiny_model, tiny_model_path):
    """Flipping the activation's sign through evaluate() == a hook written by hand: the three
    losses and the KL. At block 0: block 1 turns it into a change of the logits that the final
    norm does not undo."""
    cfg = tiny_cfg(tiny_model_path, "blocks.0.hook_resid_post")
    sae = identity_sae(32)
    with torch.no_grad():
        sae.W_dec.mul_(-1.0)
    drop = acts.special_token_ids(tiny_model.tokenizer)
    r = train.evaluate(sae, tiny_model, cfg, drop, "cpu")
    ctx = torch.stack([c for _, c in acts.iter_contexts(train._texts(cfg), tiny_model.tokenizer, 32,
                                                        held_out=16, eval=True)])
    keep = ~torch.isin(ctx, drop)

    def flip(act, hook):
        return torch.where(keep[..., None], -act, act)

    def zero(act, hook):
        return torch.where(keep[..., None], 0.0, act)
    lp = {name: tiny_model.run_with_hooks(ctx, fwd_hooks=hooks)[:, :-1].log_softmax(-1)
          for name, hooks in (("clean", []), ("sae", [("blocks.0.hook_resid_post", flip)]),
                              ("zero", [("blocks.0.hook_resid_post", zero)]))}
    for name, lp_ in lp.items():
        ce = torch.nn.functional.nll_loss(lp_.flatten(0, 1), ctx[:, 1:].flatten())
        assert r[f"ce_loss_{name}"] == pytest.approx(ce.item(), rel=1e-5)
    kl = (lp["clean"].exp() * (lp["clean"] - lp["sae"])).sum(-1).mean()
    assert r["kl_clean_sae"] == pytest.approx(kl.item(), rel=1e-4) and kl > 1e-3


def test_saes_evaluated_together_as_alone(tiny_model, tiny_model_path):
    """A list of SAEs shares the clean and zero-ablated forwards: each result as if evaluated alone."""
    cfg = tiny_cfg(tiny_model_path, "blocks.0.hook_resid_post")
    drop = acts.special_token_ids(tiny_model.tokenizer)
    flipped, relu = identity_sae(32), SAE(32, 64, "relu")
    with torch.no_grad():
        flipped.W_dec.mul_(-1.0)
    together = train.evaluate([flipped, relu], tiny_model, cfg, drop, "cpu")
    for sae, r in zip((flipped, relu), together):
        assert r == pytest.approx(train.evaluate(sae, tiny_model, cfg, drop, "cpu"), rel=1e-6)
    assert together[0]["ce_loss_sae"] != pytest.approx(together[1]["ce_loss_sae"])


def test_next_token_sums_match_whole_log_softmax():
    """Blocks of 5 positions (a partial one at the end of each context) on bf16 logits, as the LM
    gives them, against log_softmax over the whole batch."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (3, 13))
    logits = [(torch.randn(3, 13, 300) * s).bfloat16() for s in (2.0, 2.5, 4.0)]
    sums = acts.next_token_sums(tokens, *logits, rows=5)
    lp = [l[:, :-1].float().log_softmax(-1) for l in logits]
    ce = [-p.gather(-1, tokens[:, 1:, None]).sum() for p in lp]
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum()
    torch.testing.assert_close(sums, torch.stack(ce + [kl]).double(), rtol=1e-5, atol=1e-4)


# an SAE, and a transcoder whose input (a LayerNorm's output) has one norm at every token: the
# typical tokens go by the norm of the target
@pytest.mark.parametrize("hook_in", ["blocks.1.hook_resid_post", "blocks.1.ln2.hook_normalized"])
def test_explained_variance_matches_a_hand_computation(tiny_model, tiny_model_path, hook_in, monkeypatch):
    """EV = 1 - sum ||y - y_hat||^2 / sum ||y - mean y||^2 over the kept held-out tokens, and the
    "typical" EV over those whose y is within TYPICAL_NORM_RATIO x their batch's median norm (set
    to 1 here so that it leaves out half of them)."""
    monkeypatch.setattr(acts, "TYPICAL_NORM_RATIO", 1.0)
    out = "blocks.1.hook_resid_post"
    cfg = tiny_cfg(tiny_model_path, hook_in, hook_point_out=out if hook_in != out else None)
    sae = identity_sae(32)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)                                       # y_hat = x / 2
    drop = acts.special_token_ids(tiny_model.tokenizer)
    r = train.evaluate(sae, tiny_model, cfg, drop, "cpu")
    ctx = torch.stack([c for _, c in acts.iter_contexts(train._texts(cfg), tiny_model.tokenizer, 32,
                                                        held_out=16, eval=True)])
    keep = ~torch.isin(ctx, drop)
    _, cache = tiny_model.run_with_cache(ctx, names_filter=[hook_in, out])
    errs, ys = {"": [], "_typical": []}, {"": [], "_typical": []}
    for i in range(0, 16, cfg.model_batch_contexts):             # evaluate's batches of contexts
        x, y = (cache[h][i:i + 4][keep[i:i + 4]] for h in (hook_in, out))
        typical = y.norm(dim=-1) <= y.norm(dim=-1).median()
        for key, sel in (("", slice(None)), ("_typical", typical)):
            errs[key].append((y[sel] - x[sel] / 2).pow(2).sum())
            ys[key].append(y[sel])
    for key in errs:
        y = torch.cat(ys[key])
        ev = (1 - sum(errs[key]) / (y - y.mean(0)).pow(2).sum()).item()
        assert r[f"explained_variance{key}"] == pytest.approx(ev, rel=1e-4), key
    assert abs(r["explained_variance"] - r["explained_variance_typical"]) > 1e-3


@pytest.mark.xdist_group("embedded_run")
def test_trained_sae_beats_a_random_one_downstream(trained_run):
    """On the embedded model: zero-ablation > SAE > clean loss, and a random SAE of the same
    shape is far worse than a trained one. Also exercises --eval-only and eval.json."""
    out, res = trained_run
    assert res["ce_loss_zero"] > res["ce_loss_sae"] > res["ce_loss_clean"]
    assert res["ce_loss_recovered"] > 0.7 and res["kl_clean_sae"] > 0
    saved = json.load(open(out / "eval.json"))
    assert set(res) - {"jumprelu"} <= set(saved) and saved["tokens"] > 3000
    assert json.load(open(out / "jumprelu" / "eval.json"))["l0"] == res["jumprelu"]["l0"]
    cfg = train.Config(**json.load(open(out / "config.json"))["train"])
    model = acts.load_model(acts.EMBEDDED_MODEL, cfg.model_dtype)          # the run's own dtype
    random_sae = SAE(576, 8 * 576, "batchtopk", 64)
    bad = train.evaluate(random_sae, model, cfg, acts.special_token_ids(model.tokenizer), "cpu")
    assert bad["delta_lm_loss"] > 10 * res["delta_lm_loss"]
    assert bad["ce_loss_recovered"] < res["ce_loss_recovered"] - 0.3
    assert bad["explained_variance"] < res["explained_variance"] - 0.5
    # the evaluation-only entry reproduces the numbers from the saved folder
    r = subprocess.run([sys.executable, "train.py", "--eval-only", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.load(open(out / "eval.json"))
    assert again["ce_loss_sae"] == pytest.approx(res["ce_loss_sae"], rel=1e-4)


def tiny_arch(folder, config):
    """A 2-block random model of another architecture, with the embedded model's tokenizer."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(acts.embedded_model_path())
    config.update(dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# Gemma 2 has no sdpa attention (softcapping); OLMo's LayerNorm has no weight, which the bridge's
# own norm forward reads once hook_normalized is hooked; GPT-NeoX has parallel attention, no resid_mid.
@pytest.mark.parametrize("arch,hook", [("gemma2", "blocks.1.hook_resid_post"), ("olmo", "blocks.1.ln2.hook_normalized"),
                                       ("gpt_neox", "blocks.1.hook_mlp_out")])
def test_other_architectures_splice_exactly(arch, hook, tmp_path):
    from transformers import AutoConfig
    gqa = {} if arch == "gpt_neox" else dict(num_key_value_heads=2, head_dim=8)
    config = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256, **gqa)
    path = tiny_arch(tmp_path / arch, config)
    assert acts.model_dims(path)[:2] == (2, 32)
    model = acts.load_model(path, "float32", "cpu")
    r = train.evaluate(identity_sae(32), model, tiny_cfg(path, hook), acts.special_token_ids(model.tokenizer), "cpu")
    assert r["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6) and r["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert r["ce_loss_zero"] != pytest.approx(r["ce_loss_clean"])
    if arch == "gpt_neox":              # a hook of other architectures: one line naming this one's
        with pytest.raises(ValueError, match="does not exist on this model; its blocks have hook_resid_pre"):
            acts.hook_dims(model, ["blocks.1.hook_resid_mid"])


def test_model_dims_of_a_multimodal_model_are_its_language_models(tmp_path):
    from transformers import Gemma3Config
    Gemma3Config(text_config=dict(hidden_size=48, num_hidden_layers=3, max_position_embeddings=512)
                 ).save_pretrained(tmp_path)
    assert acts.model_dims(str(tmp_path)) == (3, 48, 512)
