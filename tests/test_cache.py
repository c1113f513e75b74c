"""The on-disk activation cache: exact round trip, refusal of incomplete or mismatched caches,
and training from it."""
import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import activations as acts
import train


def tiny_cfg(path, out, **kw):
    kw = dict(model=path, model_dtype="float32", hook_point_in="blocks.1.hook_resid_post",
              context_size=64, eval_tokens=1024, model_batch_contexts=4, top_k=8, batch_size=256,
              buffer_size=2048, total_training_tokens=20_000, log_frequency=10,
              exp_result_path=str(out), device="cpu") | kw
    return train.Config(**kw)


def test_cache_round_trips_exactly_and_trains(tiny_model, tiny_model_path, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    manifest = train.cache_main(tiny_cfg(tiny_model_path, tmp_path / "x", cache_activations=str(cache)))
    assert manifest["tokens"] == 20_000 and len(manifest["shards"]) == 1
    shard = load_file(cache / manifest["shards"][0]["file"])
    # recompute the same stream directly
    cfg = tiny_cfg(tiny_model_path, tmp_path / "x")
    ctx = acts.iter_contexts(train._texts(cfg), tiny_model.tokenizer, 64, held_out=16, passes=1)
    stream = acts.iter_activations(tiny_model, ctx, [cfg.hook_point_in],
                                   acts.special_token_ids(tiny_model.tokenizer), 4, "cpu", cfg.max_norm_ratio)
    x = torch.cat([a["x"] for a, _ in zip(stream, range(100))])[:20_000]
    assert torch.equal(shard["x"], x) and "y" not in shard
    assert len(shard["tokens"]) == 20_000
    assert not torch.isin(shard["tokens"], acts.special_token_ids(tiny_model.tokenizer)).any()
    # several runs (a sweep of k) reuse one cache; no LM forward while training
    for k in (4, 8):
        res = train.main(tiny_cfg(tiny_model_path, tmp_path / f"k{k}", activations=str(cache), top_k=k,
                                  eval_every=40))
        assert res["l0"] == k
        assert "held-out evaluation at step 40" in capsys.readouterr().out    # the LM is there for it
    # a second cache into the same folder is refused rather than mixed in, before the LM loads
    monkeypatch.setattr(train, "load_lm", lambda *a: pytest.fail("the LM loaded"))
    with pytest.raises(ValueError, match="already holds"):
        train.cache_main(tiny_cfg(tiny_model_path, tmp_path / "x", cache_activations=str(cache)))


def test_incomplete_or_mismatched_caches_are_refused(tiny_model_path, tmp_path):
    cache = tmp_path / "cache"
    train.cache_main(tiny_cfg(tiny_model_path, tmp_path / "x", cache_activations=str(cache),
                              total_training_tokens=4000))
    cfg = tiny_cfg(tiny_model_path, tmp_path / "run", activations=str(cache), total_training_tokens=1024)
    with pytest.raises(ValueError, match="cache holds blocks.1.hook_resid_post .*, this run reads blocks.0"):
        train.main(tiny_cfg(tiny_model_path, tmp_path / "run", activations=str(cache),
                            hook_point_in="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match="model"):
        train.main(tiny_cfg(tiny_model_path, tmp_path / "run", activations=str(cache), model="gpt2"))
    with pytest.raises(ValueError, match="eval_tokens = 1024, this run wants 4096"):   # held-out text
        train.main(tiny_cfg(tiny_model_path, tmp_path / "run", activations=str(cache), eval_tokens=4096))
    shard = cache / json.load(open(cache / "manifest.json"))["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])                      # a truncated shard
    with pytest.raises(ValueError, match="truncated"):
        train.main(cfg)
    os.remove(cache / "manifest.json")                             # an interrupted write
    with pytest.raises(ValueError, match="incomplete"):
        train.main(cfg)


def test_ranks_read_disjoint_equal_slices_and_each_pass_covers_every_token(tmp_path):
    rows = torch.arange(10 * 100, dtype=torch.float32).view(-1, 1).repeat(1, 3)     # row r holds r
    stream = ({"x": rows[i:i + 100], "tokens": torch.zeros(100, dtype=torch.long)} for i in range(0, 1000, 100))
    manifest = acts.write_cache(str(tmp_path), stream, {"sae": True}, 1000, shard_tokens=100)
    assert len(manifest["shards"]) == 10                               # 2 chunks of 4 shards, then 2
    for world in (1, 3):
        per_rank = [[c for _, c in itertools.islice(acts.iter_cache(str(tmp_path), manifest, 7, r, world), 4)]
                    for r in range(world)]
        for p in range(2):                                             # passes of 2 chunks each
            seen = torch.cat([c[:, 0] for chunks in per_rank for c in chunks[2 * p:2 * p + 2]])
            assert torch.equal(seen.sort().values, rows[:, 0])         # every token once per pass
        sizes = [sum(len(c) for c in chunks) for chunks in per_rank]
        assert max(sizes) - min(sizes) <= 2 * 10                       # equal shares, +-1 row a shard
    resumed = next(acts.iter_cache(str(tmp_path), manifest, 7, 1, 3, start=3))
    assert resumed[0] == 3 and torch.equal(resumed[1], per_rank[1][3])


def test_a_folder_that_is_not_a_cache_is_never_called_one(tmp_path):
    # a folder of text given as --activations: said to be no cache, never "delete it"
    with pytest.raises(ValueError, match="is not an activation cache") as e:
        acts.read_manifest(acts.EMBEDDED_DATASET_DIR, {})
    assert "delete" not in str(e.value) and "--cache-activations" in str(e.value)
    (tmp_path / "shard_00000.safetensors").write_bytes(b"")           # our shards, no manifest
    with pytest.raises(ValueError, match="cache is incomplete"):
        acts.read_manifest(str(tmp_path), {})
