"""Shared fixtures: the real tokenizer of the embedded model on a tiny random Llama (fast unit
tests), and the real embedded model itself (the tests that must train on real weights)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import activations as acts  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 2-block Llama with random weights and the embedded model's real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(acts.embedded_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return acts.load_model(tiny_model_path, "float32", "cpu")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short real BatchTopK run on the embedded model and the bundled text, shared by the
    tests that check training, saving, conversion and downstream evaluation on real weights:
    (folder, result)."""
    import train
    out = tmp_path_factory.mktemp("real") / "run"
    res = train.main(train.Config(total_training_tokens=49_152, batch_size=1024, buffer_size=8192,
                                  log_frequency=8, exp_result_path=str(out), eval_tokens=4096,
                                  hook_point_in="blocks.5.hook_resid_post", act_fn="batchtopk",
                                  # 48 steps: without the massive-activation tokens and with a
                                  # short lr decay, so that so short a run is already a useful SAE
                                  max_norm_ratio=10.0, lr_decay_steps=0.2))
    return out, res


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): the tests of a group run in one worker "
                            "under pytest -n N --dist loadgroup (they share a costly fixture)")


def pytest_collection_modifyitems(items):
    """A hung test fails after half an hour (with pytest-timeout, from requirements.txt) instead of
    holding the suite; even the slowest test here takes a few minutes on a busy 2-core machine."""
    for item in items:
        item.add_marker(pytest.mark.timeout(1800))
