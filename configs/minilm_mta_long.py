"""MTA at 20x the default budget: 500 outer steps x 16 episodes (the default: 100 x 4). For a GPU.

Command:
  python launch/train.py --config configs/minilm_mta_long.py --workdir runs/mta_long
  python launch/train.py --config configs/minilm_ft_long.py  --workdir runs/ft_long
  python launch/eval.py  --config configs/minilm_mta_long.py --workdir runs/mta_long \
      --ft_workdir runs/ft_long --methods=ft,mta
  (or all seeds at once: python launch/sweep.py --config configs/minilm_mta_long.py \
      --ft_config configs/minilm_ft_long.py --seeds=0,1,2 --root runs/long --methods=ft,mta)
Expected runtime (measured on one H200, JAX 0.11.2, 2-4 trainings sharing it): 4-5 min per training
including ~2 min of compilation (0.25 s/step). On 2 CPU cores about 75 min (16 episodes at ~2.3 s
per 4): not measured. Evaluation on the CPU: ~6 min for ft + mta on eight val/test sets.
Expected metric (top-1 %, unseen test tools, mean ± std over training seeds 0-3, measured with
float16-rounded weights): mta MetaTool SD 88.1 ± 0.5 / CD 91.9 ± 0.4, ToolLens SD 53.3 ± 1.6 /
CD 73.5 ± 0.8; ft_long 87.2 / 91.4 / 53.3 / 72.7 (paired mta - ft +0.9 / +0.5 / -0.0 / +0.8).
Both forget on the external sets (API-Bank ~65 vs zero-shot 71.6). BUILD_NOTES.md "Results", 20x budget.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", arg)
    c.steps = 500
    c.tasks_per_step = 16
    c.checkpoint_every = 250
    c.log_every = 50
    # Measured with the rendering the defaults had then (session 5), before compact_doc became the default.
    c.data.doc_style = "full_name_desc"
    c.data.doc_len = 48
    return c
