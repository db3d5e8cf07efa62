"""The tiny causal LM that knows the synthetic world: tokenizer, model, pre-training, cache.

Nothing is downloaded.  The tokenizer is a byte-level BPE trained on the world's
text (every world word becomes one token; any other text still round-trips
through bytes), wrapped as a ``transformers.PreTrainedTokenizerFast``.  The model
is GPT-2 (default) or Llama built from a config and pre-trained on every
question template, the locality pools' "nq question:" forms and the training
sentences until it answers its facts.  The result is saved with
``save_pretrained`` under ``{cache_dir}/tiny-{arch}-{key}``, key = hash of the
world fingerprint + model config + training config, so anything that takes a
model path (EasyEdit included) can load it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from ..cpu_kernels import cpu_kernels
from ..data.records import IGNORE_INDEX, EditRecord, tokenize_teacher_forced
from .facts import SPLITS, World, build_world
from ..cpu_kernels import fixed_threads
from .pretrain import LRSchedule, encode_corpus, length_buckets, train_loop

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ARCHS = ("gpt2", "llama")
_CACHE_FORMAT = 2   # bump when the training code changes what a cache entry holds


@dataclass(frozen=True)
class TinyLMConfig:
    """Model size and pre-training schedule (both are part of the cache key).

    Tuned for memorisation speed on CPU: one wide layer, untied output head,
    a 20x learning rate on the input embeddings (each subject row is touched
    by only ~40 of ~24k lines per epoch, and that row is where its facts end
    up), small batches and answer tokens weighted 5x.  The MLP is 16x d_model
    wide because its hidden units are the keys RLEdit edits: the more key
    dimensions, the less each edit leaks into other prompts (docs/TUNING.md
    sections 5 and 7: at the end of the 2,000-edit demo stream d_ff 384 kept
    0.28 efficacy, 1536 0.58, 3072 0.78, before the edit memory).  The wider
    MLP learns more slowly, hence the smaller step and the longer schedule, which
    decays only once the facts have taken (``schedule``; docs/TUNING.md section 13).
    """
    d_model: int = 192
    n_layer: int = 1
    n_head: int = 4
    d_ff: int = 3072
    max_positions: int = 64
    tie_embeddings: bool = False
    seed: int = 0
    epochs: int = 16               # at most; "wsd" stops after its decay epochs
    batch_size: int = 32
    lr: float = 3.5e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    answer_weight: float = 5.0     # loss weight of answer tokens relative to other tokens
    embed_lr_mult: float = 20.0    # learning-rate multiplier of the input embeddings
    # Stop early once a whole epoch answered this fraction of the answer tokens
    # right (teacher-forced, measured for free on the training batches).
    stop_accuracy: Optional[float] = None
    # The step after the warm-up.  "cosine": decays to 0 over all `epochs`.  "wsd" (warm-up,
    # stable, decay): constant until an epoch answers `decay_accuracy` of its answer tokens
    # right (or until only `decay_epochs` of the `epochs` are left), then a cosine to 0 over
    # `decay_epochs` epochs.  The facts are learnt in a rise after a plateau whose
    # length moves with rounding (another CPU, another seed); a fixed cosine leaves a late
    # riser too little step to finish (pretrain.LRSchedule).
    schedule: str = "wsd"
    decay_accuracy: float = 0.9
    decay_epochs: int = 3
    # Intra-op threads of the pre-training: a fixed number, so the same command gives the same
    # model on a busy or an idle machine (see cpu_kernels.fixed_threads).
    threads: int = 2
    # GPT-2's activation and the optimiser's kernels.  The fused ones ("gelu_pytorch_tanh", the
    # fused AdamW) compute the same functions ~1.2x faster per step, yet the three tiny LMs they
    # pre-trained knew only 86-95% of their facts, against 98% for these (docs/TUNING.md
    # section 12): kept for bench/bench_pretrain.py, not as the default.
    gpt2_activation: str = "gelu_new"
    fused_optimizer: bool = False

    @classmethod
    def for_arch(cls, arch: str, quick: bool = False) -> "TinyLMConfig":
        """The default for ``arch``.  Llama needs twice GPT-2's step (measured on the
        default world: 97.3 / 97.3 / 98.0% per split at lr 1e-2, ~42% at 5e-3) and keeps
        d_ff 384: at 1536 the same schedule reached only 94.7 / 92.2 / 95.3%.
        ``quick``: the GPT-2 of ``rledit demo --quick`` (the small world) keeps the previous
        default's narrower MLP (d_ff 1536) and cosine schedule, which pre-train in about half the
        time; the Llama default keeps the cosine schedule too (neither was re-measured with "wsd")."""
        if arch == "llama":
            return cls(lr=1e-2, d_ff=384, epochs=10, schedule="cosine")
        return cls(d_ff=1536, lr=5e-3, epochs=10, schedule="cosine") if quick else cls()


def default_cache_dir() -> str:
    return os.environ.get("RLEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "rledit")


# ---------------------------------------------------------------------------- tokenizer

def build_tokenizer(world: World):
    """Byte-level BPE trained on the world's text, as a ``PreTrainedTokenizerFast``.

    A prefix space is added (so a subject or answer is the same token at the start
    of a text and after a space) and stripped again on decode, so
    ``decode(encode(text)) == text`` for any text not starting with a space.
    The vocabulary is left unbounded: training stops when every word is one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_training_texts(world), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN,
                                   clean_up_tokenization_spaces=False,
                                   # no token_type_ids: GPT-2 would add wte[0] when a host
                                   # calls model(**tok(...)), Llama rejects the argument
                                   model_input_names=["input_ids", "attention_mask"],
                                   model_max_length=TinyLMConfig.max_positions)


def _training_texts(world: World) -> List[str]:
    return world.corpus + [f"{q} {f.object}" for f, q in world.fact_questions()]


# ---------------------------------------------------------------------------- model

def build_model(tok, arch: str = "gpt2", config: Optional[TinyLMConfig] = None, seed: int = 0):
    """A randomly initialised tiny causal LM for ``tok``'s vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cfg = config or TinyLMConfig.for_arch(arch)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        model_cfg = GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                               n_inner=cfg.d_ff, n_positions=cfg.max_positions,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               activation_function=cfg.gpt2_activation,
                               tie_word_embeddings=cfg.tie_embeddings, **common)
        return GPT2LMHeadModel(model_cfg)
    if arch == "llama":
        model_cfg = LlamaConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                                intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_positions,
                                tie_word_embeddings=cfg.tie_embeddings, **common)
        return LlamaForCausalLM(model_cfg)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- accuracy

def _prompt_answer_pairs(records: Sequence[EditRecord]) -> List[Tuple[str, str]]:
    """Every true fact a record mentions: prompt and paraphrases -> target_true, locality."""
    pairs = []
    for r in records:
        if r.target_true is not None:
            pairs.extend((p, r.target_true) for p in [r.prompt] + list(r.paraphrases))
        pairs.extend(zip(r.locality_prompts, r.locality_answers))
    return pairs


@torch.no_grad()
def pairs_accuracy(model, tok, pairs: Sequence[Tuple[str, str]], batch_size: int = 256) -> float:
    """Mean over prompts of the teacher-forced answer-token accuracy."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = tokenize_teacher_forced(tok, [p for p, _ in chunk], [a for _, a in chunk],
                                        device=device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        correct = (logits[:, :-1].argmax(-1) == labels) & mask
        scores.append(correct.sum(1).float() / mask.sum(1).float())
    model.train(was_training)
    return torch.cat(scores).mean().item()


def fact_accuracy(model, tok, records: Sequence[EditRecord], batch_size: int = 256) -> float:
    """Teacher-forced answer accuracy on the records' *true* facts: edit prompts and
    paraphrases with ``target_true``, locality prompts with their answers."""
    return pairs_accuracy(model, tok, _prompt_answer_pairs(records), batch_size)


# ---------------------------------------------------------------------------- training

def train_tiny_lm(world: World, tok, arch: str = "gpt2", config: Optional[TinyLMConfig] = None,
                  progress: bool = True):
    """Pre-train a fresh tiny LM on the world; returns ``(model, stats)``."""
    cfg = config or TinyLMConfig.for_arch(arch)
    model = build_model(tok, arch, cfg, seed=cfg.seed)
    model.train()
    lines = encode_corpus(world, tok)
    too_long = max(len(ids) for ids, _, _ in lines)
    if too_long > cfg.max_positions:
        raise ValueError(f"a training line has {too_long} tokens > max_positions={cfg.max_positions}")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(length_buckets(lines, cfg.batch_size, torch.Generator()))
    total_steps = steps_per_epoch * cfg.epochs
    embed = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for p in model.parameters():
        if p is not embed:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0},
                               {"params": [embed], "weight_decay": 0.0,
                                "lr": cfg.lr * cfg.embed_lr_mult}],
                              lr=cfg.lr, betas=(0.9, 0.98), fused=cfg.fused_optimizer)

    schedule = LRSchedule(cfg.schedule, cfg.warmup_steps, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    threads = f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''}"
    with fixed_threads(cfg.threads):
        stats = train_loop(model, lines, cfg, optim, sched, schedule, gen, steps_per_epoch,
                           f"pre-training tiny {arch} ({threads})", progress)
    model.eval()
    return model, dict(stats, threads=cfg.threads)


# ---------------------------------------------------------------------------- cache

def cache_key(world: World, arch: str, config: TinyLMConfig) -> str:
    """The entry's name: the world, the architecture, the config and torch's CPU kernels
    (AVX2 and AVX-512 kernels pre-train different models: cpu_kernels.py)."""
    payload = {"world": world.fingerprint(), "arch": arch, "config": asdict(config),
               "format": _CACHE_FORMAT, "cpu_kernels": cpu_kernels()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: str):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    model.config._name_or_path = path
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.model_input_names = ["input_ids", "attention_mask"]
    with open(os.path.join(path, "rledit_info.json"), encoding="utf-8") as fh:
        info = json.load(fh)
    return model, tok, info


def load_or_train_tiny_lm(world: Optional[World] = None, arch: str = "gpt2",
                          cache_dir: Optional[str] = None, progress: bool = True,
                          config: Optional[TinyLMConfig] = None):
    """The pre-trained tiny LM of ``world`` (default world when None): ``(model, tok, info)``.

    Loaded from ``{cache_dir}/tiny-{arch}-{key}`` when present; otherwise trained,
    scored per split and written atomically (temporary directory + rename), so an
    interrupted run never leaves a half-written entry.  ``info`` holds ``path``,
    ``accuracy`` (per split), ``seconds`` (pre-training time), ``params``,
    ``cached`` (True when loaded).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    world = world or build_world()
    cfg = config or TinyLMConfig.for_arch(arch)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    path = os.path.join(cache_dir, f"tiny-{arch}-{cache_key(world, arch, cfg)}")
    if os.path.isfile(os.path.join(path, "rledit_info.json")):
        model, tok, info = _load(path)
        return model, tok, dict(info, path=path, cached=True)

    tok = build_tokenizer(world)
    model, stats = train_tiny_lm(world, tok, arch, cfg, progress)
    accuracy = {s: fact_accuracy(model, tok, world.records(s)) for s in SPLITS}
    info = {"accuracy": accuracy, "seconds": stats["seconds"],
            "cpu_seconds": stats["cpu_seconds"], "epochs": stats["epochs"],
            "steps": stats["steps"], "history": stats["history"],
            "params": count_parameters(model), "arch": arch, "config": asdict(cfg),
            "world_fingerprint": world.fingerprint(), "threads": stats["threads"],
            "cpu_kernels": cpu_kernels()}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "rledit_info.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:   # a concurrent run finished first: keep its entry
            if not os.path.isfile(os.path.join(path, "rledit_info.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Hand back what a later run will load, not the in-memory objects: a freshly built model and
    # tokenizer differ from the reloaded ones in details that change results (the first and the
    # second `rledit demo` on a machine gave different numbers before this).
    model, tok, _ = _load(path)
    return model, tok, dict(info, path=path, cached=False)


def random_tiny_lm(world: Optional[World] = None, arch: str = "gpt2", seed: int = 0,
                   tok=None, **sizes):
    """An untrained tiny LM and the world's tokenizer, for fast tests: ``(model, tok)``.

    ``sizes`` override :class:`TinyLMConfig` fields (e.g. ``d_model=32, n_layer=2``).
    """
    tok = tok or build_tokenizer(world or build_world())
    cfg = replace(TinyLMConfig(), **sizes)
    model = build_model(tok, arch, cfg, seed=seed)
    model.eval()
    model.config._name_or_path = f"tiny-{arch}-random"
    return model, tok
