"""MTA at 20x the default budget: 500 outer steps x 16 episodes (the default: 100 x 4). For a GPU.

Command:
  python launch/train.py --config configs/minilm_mta_long.py --workdir runs/mta_long
  python launch/train.py --config configs/minilm_ft_long.py  --workdir runs/ft_long
  python launch/eval.py  --config configs/minilm_mta_long.py --workdir runs/mta_long \
      --ft_workdir runs/ft_long --methods=ft,mta,ft:0.5,mta:0.5
  (or all seeds at once: python launch/sweep.py --config configs/minilm_mta_long.py \
      --ft_config configs/minilm_ft_long.py --seeds=0,1,2 --root runs/long --methods=ft,mta)
Expected runtime (measured on one H100, JAX 0.11.2, MTA and FT of a seed side by side,
`SECTIONS=long launch/gpu_check.sh`): 47-64 s per seed for both trainings including data prep and
compilation (MTA 45 ms/step, FT 54 ms/step; device peak 4.6 / 1.9 GB). On 2 CPU cores, measured
end to end on an AMD Zen 5 host (session 19, seed 0, quiet): MTA 63 min (7.5 s/step, 7.4 GB RSS),
FT 25 min (2.9-3.3 s/step); expect 1.5-1.7x that on the older hosts (the main job's ratio).
Evaluating ft + mta on the eight val/test protocol sets: 82 s on the H100 for five seeds side by
side, ~6 min per seed on the CPU.
Expected metric (top-1 %, unseen test tools, mean over training seeds 0-4, float16-rounded weights;
BUILD_NOTES.md "Results", session 17): mta MetaTool SD 89.1 / CD 92.5, ToolLens SD 60.1 / CD 79.1;
ft 88.5 / 92.2 / 57.9 / 77.4 (paired mta - ft +0.6 / +0.3 / +2.2 / +1.7, MTA ahead on every seed).
Both forget on the external sets (API-Bank ~62 vs zero-shot 71.6); halfway back to the pretrained
weights (mta:0.5, chosen on val) MetaTool 89.1 / 92.0, ToolLens 61.8 / 80.4, API-Bank 67.3.
Docs: the defaults' compact_doc at 64 tokens. Session 5's 20x runs used the rendering the defaults had
then: --config.data.doc_style=full_name_desc --config.data.doc_len=48 (mta 88.1 / 91.9 / 53.3 / 73.5).
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", arg)
    c.steps = 500
    c.tasks_per_step = 16
    c.checkpoint_every = 250
    c.log_every = 50
    return c
