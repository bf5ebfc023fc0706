"""A seconds-long run of the decoder pipeline on a tiny random Qwen2-style model, for tests and CI.

Command:
  python launch/train.py --config configs/tiny_decoder.py --workdir /tmp/tiny_dec
  python launch/eval.py  --config configs/tiny_decoder.py --workdir /tmp/tiny_dec \
      --methods=random,zero_shot,mta,mta@gen --sets=metatool/val_sd
Expected runtime: ~20-60 s on 2 CPU cores (mostly compilation). Expected metric: none (random
weights); it checks plumbing, shapes, checkpoints and the results schema, not accuracy.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "qwen2_mta", None)
    c.steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.tasks_per_step = 2
    c.model.path = "random-tiny-decoder"   # 2-layer width-32 Qwen2-style, random weights, MiniLM tokenizer
    c.model.dtype = "float32"
    c.model.remat = False
    c.data.datasets = ("metatool",)
    c.data.query_len = 192
    c.data.doc_len = 12
    c.episode.tools_per_episode = 4
    c.episode.candidates = 3
    c.episode.support = 2
    c.episode.query = 2
    c.lora.rank = 2
    c.meta.inner_lr = 0.1
    c.outer.lr = 1e-3
    c.outer.warmup = 1
    c.mesh.data = 1
    c.eval.methods = ("random", "zero_shot", "mta", "mta@gen")
    c.eval.sets = ("metatool/val_sd",)
    c.eval.max_len = 192
    c.eval.batch_size = 16
    if arg:
        raise ValueError(f"tiny_decoder takes no config argument, got {arg!r}")
    return c
