"""Small configurations shared by the tests."""

from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig


def tiny_configs(data, corpus, **train_kwargs) -> tuple[TinyLMConfig, TrainConfig]:
    """A two-layer TinyLM of width 16 on ``data`` and a 30-step run on ``corpus``."""
    model_cfg = TinyLMConfig(vocab_size=data.vocab_size, d_model=16, n_heads=2, n_layers=2,
                             max_seq_len=32, window=4, chunk_size=8, controller_hidden=8)
    defaults = dict(steps=30, batch_size=4, seq_len=32, eval_every=30, eval_batches=1,
                    checkpoint_every=30, dataset=str(corpus), lr=1e-2)
    return model_cfg, TrainConfig(**{**defaults, **train_kwargs})
