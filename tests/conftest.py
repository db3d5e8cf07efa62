"""Shared fixtures: the default world, its tokenizer, the pre-trained tiny LM and
tiny random models.  Session-scoped objects are built once; tests get copies so
an in-place edit in one test never leaks into another."""
import copy
import os
import random
from pathlib import Path

import pytest
import torch

from rledit_plugin.world.facts import build_world
from rledit_plugin.world.tiny_lm import build_tokenizer, load_or_train_tiny_lm, random_tiny_lm

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir() -> str:
    """$RLEDIT_CACHE, else a repo-local cache so CI pre-trains once per clone."""
    return os.environ.get("RLEDIT_CACHE") or str(REPO_ROOT / ".cache" / "rledit")


test_cache_dir.__test__ = False   # a helper, not a test


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def world():
    return build_world()


@pytest.fixture(scope="session")
def _world_tokenizer(world):
    return build_tokenizer(world)


@pytest.fixture
def world_tokenizer(_world_tokenizer):
    """The world's tokenizer (a copy: some hosts flip ``padding_side``)."""
    return copy.deepcopy(_world_tokenizer)


@pytest.fixture(scope="session")
def tiny_lm_pretrained(world):
    """(model, tok, info) of the cached pre-trained default tiny GPT-2 (shared; do not edit)."""
    return load_or_train_tiny_lm(world, arch="gpt2", cache_dir=test_cache_dir(), progress=False)


@pytest.fixture
def tiny_lm(tiny_lm_pretrained):
    """(model, tok): a private copy of the pre-trained default, free to edit in place."""
    model, tok, _ = tiny_lm_pretrained
    return copy.deepcopy(model), copy.deepcopy(tok)


@pytest.fixture
def random_gpt2(_world_tokenizer):
    """(model, tok): a tiny randomly initialised GPT-2 on the world's tokenizer."""
    return random_tiny_lm(arch="gpt2", tok=copy.deepcopy(_world_tokenizer),
                          d_model=32, n_layer=2, n_head=2, d_ff=64)


@pytest.fixture
def random_llama(_world_tokenizer):
    """(model, tok): a tiny randomly initialised Llama on the world's tokenizer."""
    return random_tiny_lm(arch="llama", tok=copy.deepcopy(_world_tokenizer),
                          d_model=32, n_layer=2, n_head=2, d_ff=64)
