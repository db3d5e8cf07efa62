"""Shared fixtures: the default world, its tokenizer, the pre-trained tiny LM and
tiny random models.  Session-scoped objects are built once; tests get copies so
an in-place edit in one test never leaks into another."""
import copy
import os
import random
from pathlib import Path

from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # before any torch operation: the suite's tiny LM is the demo's on every CPU

import pytest  # noqa: E402
import torch  # noqa: E402

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


# ---------------------------------------------------------------- tiny builders
# Hand-made tokenizers and models for tests that need their own small vocabulary
# (their own corpus) rather than the world's: seeded, built in milliseconds.

def bpe_tokenizer(lines, vocab_size: int, with_bos: bool = False):
    """Byte-level BPE (no prefix space) trained on ``lines``; ``<eos>`` = 0 (also the pad
    token), ``<s>`` = 1. ``with_bos``: Llama-style, the tokenizer adds BOS to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>",
                                   bos_token="<s>")


def tiny_gpt2(tok, d_model: int = 32, d_ff=None, seed: int = 0, **config):
    """A seeded random 2-layer, 2-head GPT-2 for ``tok`` (no dropout, 64 positions), eval mode.
    ``d_ff=None`` is GPT-2's 4 x d_model; ``config`` adds or overrides GPT2Config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tok), n_positions=64, n_embd=d_model, n_inner=d_ff, n_layer=2,
                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    fields.update(config)
    return GPT2LMHeadModel(GPT2Config(**fields)).eval()


def tiny_llama(tok, d_model: int = 32, d_ff: int = 64, seed: int = 0, **config):
    """A seeded random 2-layer, 2-head Llama for ``tok`` (eos = pad = 0, bos = 1), eval mode;
    ``config`` adds or overrides LlamaConfig fields (e.g. ``num_key_value_heads``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_ff,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    fields.update(config)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: faster, and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
