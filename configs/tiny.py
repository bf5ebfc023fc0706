"""A seconds-long run of the whole pipeline on a tiny random encoder, for tests and CI.

Command:
  python launch/train.py --config configs/tiny.py --workdir /tmp/tiny
  python launch/eval.py  --config configs/tiny.py --workdir /tmp/tiny --methods=random,bm25,zero_shot,mta
Expected runtime: ~10-30 s on 2 CPU cores (mostly compilation). Expected metric: none (random weights);
it checks plumbing, shapes, checkpoints and the results schema, not accuracy.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", None)
    c.steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.tasks_per_step = 2
    c.model.path = "random-tiny"   # 2-layer width-32 BERT, random weights, MiniLM's tokenizer
    c.data.datasets = ("metatool",)
    c.data.query_len = 16
    c.data.doc_len = 16
    c.episode.tools_per_episode = 6
    c.episode.support = 2
    c.episode.query = 2
    c.lora.first_layer = 1
    c.lora.rank = 2
    c.mesh.data = 1                # one device: tests run it under 8 fake devices too
    c.eval.sets = ("metatool/val_sd",)
    c.eval.val_sets = ("metatool/val_sd",)
    c.eval.max_len = 32
    c.eval.batch_size = 32
    if arg:
        raise ValueError(f"tiny takes no config argument, got {arg!r}")
    return c
