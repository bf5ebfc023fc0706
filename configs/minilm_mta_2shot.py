"""MTA with 5-way 2-shot episodes: every tool of an episode has two support items, so about half of
the inner step transfers to the episode's other queries (10% with the default episodes).

Command (four training seeds were measured as minilm_mta with the overrides below, which this file
pins; tests/test_launch.py checks that):
  python launch/train.py --config configs/minilm_mta_2shot.py --workdir runs/mta_2shot
  python launch/train.py --config configs/minilm_ft_2shot.py  --workdir runs/ft_2shot
  python launch/eval.py  --config configs/minilm_mta_2shot.py --workdir runs/mta_2shot \
      --ft_workdir runs/ft_2shot --methods=ft,mta,ft_adapt,mta_adapt \
      --sets=metatool/test_sd,metatool/test_cd,toollens/test_sd,toollens/test_cd
  (or: python launch/sweep.py --config configs/minilm_mta_2shot.py --ft_config configs/minilm_ft_2shot.py
      --seeds=0,1,2,3 --root runs/2shot --methods=ft,mta,ft_adapt,mta_adapt --sets=<val sets>)
Expected runtime (2 CPU cores, AMD Zen 5 host, session 22): MTA training 5.2 min (100 steps at ~3.0 s/step),
FT 2.3 min; the evaluation above ~8 min per seed (the two ``*_adapt`` methods are most of it); on the
four val sets ~5 min.
Expected metric (top-1 %, unseen test tools, protocol seeds 0-4, mean over training seeds 0-3;
BUILD_NOTES.md "Results on val", session 22): mta MetaTool SD 90.2 / CD 93.1, ToolLens SD 60.3 / CD 79.7;
mta_adapt 90.4 / 93.3 / 61.8 / 80.1; ft 90.1 / 93.1 / 59.9 / 79.7; ft_adapt 90.3 / 93.2 / 60.6 / 79.9.
mta_adapt - ft_adapt is +1.2 on ToolLens SD on all four seeds (val: +1.2 / +1.1 on ToolLens SD / CD,
4/4 seeds); every other difference is inside the seeds' spread.
Also: LoRA on layers 2-5 and temperature 10 (the MetaTool row of the README); with 5 tools per episode
and 5 candidates, every item is scored against all five tools of its episode.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", arg)
    c.lora.first_layer = 2
    c.loss.scale = 10.0
    c.episode.tools_per_episode = 5
    c.episode.support = 10
    c.episode.query = 10
    c.eval.methods = ("zero_shot", "mta", "mta_adapt")
    return c
