"""MetaToolAgent on the CPU default backbone: second-order MAML over LoRA of all-MiniLM-L6-v2.

Command (2 CPU cores; the README's first command runs it together with the FT baseline and eval):
  python launch/train.py --config configs/minilm_mta.py --workdir runs/minilm_mta
  python launch/eval.py  --config configs/minilm_mta.py --workdir runs/minilm_mta \
      --methods=random,bm25,zero_shot,mta
Expected runtime (2 CPU cores, measured): training 5.5 min (100 steps, ~3.1 s/step after ~13 s of data prep
and compilation); evaluating the default methods on the nine test sets ~4 min (main job: 11.7 min). On a
2-core AMD Zen 5 host: training 3.3 min, main job 7.6 min (session 22); on a Zen 4 host 5.5 / 13.9 min
(session 25).
Expected metric (mta, top-1 %, unseen test tools, protocol seeds 0-4, training seeds 0-7): MetaTool SD
88.6 / CD 91.1, ToolLens SD 61.8 / CD 80.4; seed 0 (the main job): 89.1 ± 0.2 / 91.8 ± 0.2 / 62.1 ± 0.3 /
80.1 ± 0.1. Full table in BUILD_NOTES.md "Results".
Docs: `compact_doc` (ToolLens tools as name / endpoint, description, category, parameters with their
descriptions and the return keys, without JSON syntax; MetaTool's as "{name}: {description}"), cut at 64
tokens in training. The reference rendering of zero_shot stays "{name}: {description}";
--config.data.doc_style=full_name_desc --config.data.doc_len=48 gives the pre-session-10 default
(ToolLens test 50.6 / 73.7 over training seeds 0-4), full_doc with doc_len=128 the raw JSON doc at ~2x the training time.

Meta-task: an episode is a tool subset of one train domain (SD) or mixed domains (CD) with support
and query items whose 5 candidates come from that subset; the inner loop adapts the LoRA tree on the
support items, the outer loop differentiates the query loss through it (true second order), plus the
support loss before adaptation (``meta.support_weight``), so every labelled item trains the init.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 100
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.eval_every = 0            # > 0: val accuracy (eval.val_sets) every this many steps, in metrics.jsonl
    c.init_from = ""            # another workdir to start from (when this one has no checkpoint)
    c.tasks_per_step = 4
    c.prefetch = 2

    c.model = ml_collections.ConfigDict(dict(kind="encoder", path="", dtype="float32", remat=False))  # "" = packaged MiniLM
    c.loss = ml_collections.ConfigDict(dict(
        scale=20.0,          # inverse temperature of the cosine logits
        dataset_scale=""))   # per train dataset, e.g. "metatool=10": that dataset's episodes use it
    c.data = ml_collections.ConfigDict(dict(
        datasets=("metatool", "toollens"), doc_style="compact_doc", query_len=40, doc_len=64))
    c.episode = ml_collections.ConfigDict(dict(
        tools_per_episode=8, support=5, query=5, candidates=5, regime="mixed",
        dataset_weighting="uniform",
        support_labels="gold",    # "hidden": unlabelled support items (entropy inner loss; mta_tta)
        support_source="items",   # "docs": the support set is the episode tools' own docs (mta_docs)
        query_tools="shared"))    # "disjoint": support and query items on disjoint halves of the tools
    c.lora = ml_collections.ConfigDict(dict(
        rank=8, alpha=16.0, targets=r"layers/(attn/(q|k|v|o)|mlp/(up|down))/kernel", first_layer=4))
    c.meta = ml_collections.ConfigDict(dict(
        algorithm="maml", inner_steps=1, inner_lr=0.05, first_order=False, remat=True,
        inner_optimizer="sgd", inner_clip=0.0, inner_hvp="reverse",  # "forward": InnerConfig.hvp
        adapt_pattern="", imaml_lambda=1.0, imaml_cg_steps=5,
        task_chunk=0, support_weight=1.0))  # adapt_pattern (anil): regex on LoRA paths, e.g. "layers/mlp/.*"
    c.outer = ml_collections.ConfigDict(dict(lr=1e-3, warmup=20, clip=1.0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    c.eval = ml_collections.ConfigDict(dict(
        methods=("random", "bm25", "zero_shot", "mta"),
        sets=("metatool/test_sd", "metatool/test_cd", "toollens/test_sd", "toollens/test_cd",
              "bfcl/multiple", "bfcl/live_multiple", "seal_tools/dev", "seal_tools/test_in_domain",
              "api_bank/level-1"),
        val_sets=("metatool/val_sd", "metatool/val_cd", "toollens/val_sd", "toollens/val_cd"),
        max_len=256, adapt_shots=5, adapt_max_support=256, batch_size=128, batch_tokens=8192,
        adapt_steps=0, adapt_lr=0.0,  # mta_adapt/ft_adapt inner loop at test time (0: as trained)
        protocol_seeds=(0, 1, 2, 3, 4),  # MetaTool / ToolLens seed files averaged (fewer: cheaper)
        max_items=0))  # > 0: score a fixed random subset of this many items per set file (0: all)
    if arg:
        raise ValueError(f"minilm_mta takes no config argument, got {arg!r}")
    return c
