"""The token stream: packing, rank slices, token hygiene, the mixing buffer."""
import itertools
import threading

import pytest
import torch

import activations as acts


def texts():
    return ["The first document is here. " * 20, "A second, shorter one.", "And a third. " * 40]


def test_contexts_start_with_bos_and_have_the_right_length(tiny_model):
    tok = tiny_model.tokenizer
    ctxs = list(acts.iter_contexts(lambda: texts(), tok, 16, passes=1))
    assert len(ctxs) > 5
    for i, (idx, c) in enumerate(ctxs):
        assert idx == i and c.shape == (16,) and c[0] == tok.bos_token_id
        assert (c[1:] != tok.bos_token_id).all()
    # documents are separated by EOS
    assert sum((c == tok.eos_token_id).sum().item() for _, c in ctxs) >= 2


def test_contexts_are_the_documents_packed_in_order(tiny_model):
    """Tokenized a document ahead in a thread, the contexts are still exactly the documents'
    tokens, EOS after each, in order, cut every context_size - 1 tokens behind a BOS."""
    tok = tiny_model.tokenizer
    stream = [t for text in texts() for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    want = [[tok.bos_token_id] + stream[a:a + 15] for a in range(0, len(stream) - 14, 15)]
    assert [c.tolist() for _, c in acts.iter_contexts(lambda: texts(), tok, 16, passes=1)] == want


def test_ahead_keeps_the_order_runs_in_a_thread_and_raises_the_errors():
    main, in_main = threading.current_thread(), []

    def fn(x):
        in_main.append(threading.current_thread() is main)
        if x == 3:
            raise ValueError("bad item")
        return x * 2
    results = acts.ahead(fn, range(5))
    assert [next(results) for _ in range(3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="bad item"):
        next(results)
    assert len(in_main) >= 4 and not any(in_main)


def test_ranks_are_disjoint_and_cover_every_context(tiny_model):
    tok = tiny_model.tokenizer
    all_ids = [i for i, _ in acts.iter_contexts(lambda: texts(), tok, 16, held_out=2, passes=1)]
    per_rank = [[i for i, _ in acts.iter_contexts(lambda: texts(), tok, 16, r, 2, held_out=2, passes=1)]
                for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == all_ids
    assert 0 not in all_ids and 1 not in all_ids                 # held out for evaluation
    held = [i for i, _ in acts.iter_contexts(lambda: texts(), tok, 16, held_out=2, eval=True)]
    assert held == [0, 1]


def test_every_pass_is_cut_alike_so_held_out_text_is_never_trained_on(tiny_model):
    tok = tiny_model.tokenizer
    one = [c.tolist() for _, c in acts.iter_contexts(lambda: texts(), tok, 16, held_out=2, passes=1)]
    three = [c.tolist() for _, c in acts.iter_contexts(lambda: texts(), tok, 16, held_out=2, passes=3)]
    assert three == one * 3         # (a pass's contexts leave out the held-out ones: test above)


def test_resume_start_skips_exactly_the_consumed_contexts(tiny_model):
    tok = tiny_model.tokenizer
    full = list(acts.iter_contexts(lambda: texts(), tok, 16, passes=3))
    rest = list(acts.iter_contexts(lambda: texts(), tok, 16, start=7, passes=3))
    assert [i for i, _ in rest] == [i for i, _ in full[7:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[7:]))


def test_too_small_a_dataset_is_an_error_not_a_hang(tiny_model):
    """3 documents make a handful of contexts: holding out all of them, or splitting the rest over
    more processes than there are contexts, would leave a rank waiting forever."""
    n = sum(1 for _ in acts.iter_contexts(texts, tiny_model.tokenizer, 16, passes=1))
    for held_out, world in ((n, 1), (n - 2, 3)):
        for rank in range(world):          # every rank, also one that got a context, at the pass's end
            with pytest.raises(ValueError, match=f"too few for {world} process"):
                list(itertools.islice(acts.iter_contexts(texts, tiny_model.tokenizer, 16, rank=rank,
                                                         world_size=world, held_out=held_out), 10))
    for rank in range(2):                  # 2 contexts for 2 processes: each gets one every pass
        two = itertools.islice(acts.iter_contexts(texts, tiny_model.tokenizer, 16, rank=rank, world_size=2,
                                                  held_out=n - 2), 3)
        assert len(list(two)) == 3


def test_special_tokens_never_reach_the_sae(tiny_model):
    tok = tiny_model.tokenizer
    drop = acts.special_token_ids(tok, [13])                   # 13: an extra ignored id
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 13} <= set(drop.tolist())
    ctxs = list(acts.iter_contexts(lambda: texts(), tok, 16, passes=1))
    tokens = torch.stack([c for _, c in ctxs])
    # Mark each position by its token id through a hook-free check: the number of kept rows and
    # the rows themselves must be exactly those of the non-special positions.
    out = list(acts.iter_activations(tiny_model, iter(ctxs), ["blocks.1.hook_resid_post"], drop, n_contexts=4))
    x = torch.cat([o["x"] for o in out])
    keep = ~torch.isin(tokens, drop)
    assert len(x) == keep.sum() < tokens.numel()
    _, cache = tiny_model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    assert torch.allclose(x, cache["blocks.1.hook_resid_post"][keep], atol=1e-5)
    assert out[-1]["last"] == len(ctxs) - 1                    # the last context index
    assert torch.equal(torch.cat([o["tokens"] for o in out]), tokens[keep])


def batches(chunks, *args, **kw):
    """mix over chunks tagged with their index: the batches alone."""
    return [b for b, _ in acts.mix(((c, i) for i, c in enumerate(chunks)), *args, **kw)]


def test_mixing_buffer_yields_every_token_exactly_once():
    chunks = [torch.arange(i * 100, (i + 1) * 100)[:, None].float() for i in range(13)]
    out = torch.cat(batches(chunks, buffer_size=300, batch_size=32, seed=42))
    assert sorted(out.flatten().tolist()) == list(range(1300))
    assert not torch.equal(out.flatten(), torch.arange(1300).float())        # it did shuffle
    # the same seed gives the same order; another seed another
    again = torch.cat(batches(chunks, 300, 32, 42))
    other = torch.cat(batches(chunks, 300, 32, 43))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_mixing_buffer_resumes_at_the_same_row():
    chunks = [torch.arange(i * 50, (i + 1) * 50)[:, None].float() for i in range(20)]
    full = batches(chunks, 200, 16, seed=1)
    # the state after batch 9 says which chunk was read last; a new mix from the chunk after it,
    # given that state, serves exactly the batches that the uninterrupted one served after batch 9
    gen = acts.mix(((c, i) for i, c in enumerate(chunks)), 200, 16, seed=1)
    first, states = zip(*itertools.islice(gen, 9))
    saved = states[-1]
    assert saved["source"] < len(chunks) - 1 and all(s is not saved for s in states[:-1])   # a new dict each time
    after = chunks[saved["source"] + 1:]
    rest = [b for b, _ in acts.mix(((c, i) for i, c in enumerate(after)), 200, 16, seed=1, state=dict(saved))]
    assert all(torch.equal(a, b) for a, b in zip(list(first) + rest, full)) and len(first) + len(rest) == len(full)
    # resumed where the device is a GPU, it shuffles on the CPU as the checkpointed run did
    on_gpu = [b for b, _ in acts.mix(((c, i) for i, c in enumerate(after)), 200, 16, seed=1, device="cuda",
                                     state=dict(saved))]
    assert all(torch.equal(a, b) for a, b in zip(on_gpu, rest)) and len(on_gpu) == len(rest)
    if not torch.cuda.is_available():           # and one shuffled on a GPU cannot resume without one
        with pytest.raises(ValueError, match="shuffled on a GPU"):
            batches(chunks, 200, 16, seed=1, state={**saved, "rng_device": "cuda"})


def test_hook_point_check_lists_valid_ones():
    acts.check_hook_point("blocks.15.hook_resid_post", 30)
    acts.check_hook_point("blocks.3.ln2.hook_normalized", 30)
    for bad in ("blocks.30.hook_resid_post", "blocks.2.hook_nonsense", "resid_post"):
        try:
            acts.check_hook_point(bad, 30)
            raise AssertionError(bad)
        except ValueError as e:
            assert "blocks.15.hook_resid_post" in str(e)


def test_jsonl_folders_read_the_text_column_and_name_a_bad_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"body": "four"}\n')
    assert list(itertools.islice(acts.iter_texts(str(tmp_path)), 3)) == ["one", "two", "three"]
    with pytest.raises(ValueError, match=r"b.jsonl, line 2, has no key 'text' .*'body'.*--text-column"):
        list(acts.iter_texts(str(tmp_path)))
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"text": "fo\n')
    with pytest.raises(ValueError, match=r"b.jsonl, line 2: not JSON"):
        list(acts.iter_texts(str(tmp_path)))


def test_a_bad_byte_names_the_file_and_its_offset(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine text\n")
    (tmp_path / "b.txt").write_bytes(b"abc\xa2def")
    with pytest.raises(ValueError, match=r"b.txt: not UTF-8 text: byte 3 is b'\\xa2'"):
        list(acts.iter_texts(str(tmp_path)))
    (tmp_path / "b.txt").unlink()
    # past the first block a text file reads: the offset is still the file's
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "one"}\n' * 1000 + b'{"text": "t\xa2o"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl: not UTF-8 text: byte 16,011 is b'\\xa2'"):
        list(acts.iter_texts(str(tmp_path)))


def test_max_norm_ratio_drops_outliers_and_counts_them(tiny_model):
    tok = tiny_model.tokenizer
    ctxs = list(acts.iter_contexts(lambda: texts(), tok, 16, passes=1))[:4]
    drop = acts.special_token_ids(tok)
    hook = "blocks.1.hook_resid_post"
    a, = acts.iter_activations(tiny_model, iter(ctxs), [hook], drop, n_contexts=4)
    b, = acts.iter_activations(tiny_model, iter(ctxs), [hook], drop, n_contexts=4, max_norm_ratio=1.0)
    x_all, n0, x, n_out = a["x"], a["outliers"], b["x"], b["outliers"]
    norms = x_all.norm(dim=1)
    assert n0 == 0 and n_out == int((norms > norms.median()).sum()) > 0
    assert len(x) == len(x_all) - n_out and torch.equal(x, x_all[norms <= norms.median()])
    assert (x.norm(dim=1) <= norms.median() + 1e-6).all()
    # several hooks side by side, filtered by the first one's norms
    c, = acts.iter_activations(tiny_model, iter(ctxs), [hook, "blocks.0.hook_resid_post"], drop, n_contexts=4,
                               max_norm_ratio=1.0)
    assert c["x"].shape == (len(x), 64) and torch.equal(c["x"][:, :32], x) and c["outliers"] == n_out


def test_bridge_activations_equal_a_raw_hf_forward(tiny_model, tiny_model_path):
    """load_model hands attention and RMSNorm to the HF modules (sdpa) where no hook needs the
    bridge's own versions; the hooked activations must still be the model's own: the residual
    stream, the MLP's normalized input (its hook makes the norm compute the bridge's way) and the
    MLP output, against a plain HF forward with PyTorch hooks."""
    from transformers import AutoModelForCausalLM
    raw = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    layer = raw.model.layers[1]
    got = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: got.update(ln2=o))
    layer.mlp.register_forward_hook(lambda m, i, o: got.update(mlp=o))
    layer.register_forward_hook(lambda m, i, o: got.update(resid=o[0] if isinstance(o, tuple) else o))
    tokens = torch.stack([c for _, c in itertools.islice(
        acts.iter_contexts(lambda: acts.iter_texts(acts.EMBEDDED_DATASET), tiny_model.tokenizer, 64), 3)])
    with torch.no_grad():
        raw.model(tokens)
    names = ["blocks.1.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    _, cache = tiny_model.run_with_cache(tokens, names_filter=names)
    for name, ref in zip(names, (got["resid"], got["ln2"], got["mlp"])):
        assert torch.allclose(cache[name], ref, atol=1e-5), name
    assert tiny_model.original_model.config._attn_implementation == "sdpa"
