"""The offline embedded default: a synthetic factual world and a tiny LM that knows it."""
from .facts import (NQ_PREFIX, RELATIONS, SPLITS, Fact, Relation, World, WorldConfig,
                    build_world, write_world_files)
from .tiny_lm import (TinyLMConfig, build_model, build_tokenizer, default_cache_dir,
                      fact_accuracy, load_or_train_tiny_lm, random_tiny_lm)

__all__ = ["NQ_PREFIX", "RELATIONS", "SPLITS", "Fact", "Relation", "World", "WorldConfig",
           "build_world", "write_world_files", "TinyLMConfig", "build_model", "build_tokenizer",
           "default_cache_dir", "fact_accuracy", "load_or_train_tiny_lm", "random_tiny_lm"]
