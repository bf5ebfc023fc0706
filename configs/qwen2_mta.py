"""MetaToolAgent on a Qwen2 decoder: second-order MAML over LoRA (r=8, q/v, all layers), bf16 compute.

Needs a GPU/TPU and a local HF checkpoint folder (config.json, safetensors, tokenizer.json), e.g.
Qwen/Qwen2-0.5B-Instruct downloaded beforehand; pass it as the config argument:
  python launch/train.py --config configs/qwen2_mta.py:/ckpt/Qwen2-0.5B-Instruct --workdir runs/qwen2_mta
  python launch/eval.py  --config configs/qwen2_mta.py:/ckpt/Qwen2-0.5B-Instruct --workdir runs/qwen2_mta \
      --methods=random,bm25,zero_shot,mta,mta@gen
Expected runtime (measured on one H100 with random weights of Qwen2-0.5B's shapes,
``--config.model.path=random:qwen2_0_5b``, JAX 0.11.2, the entry points' default XLA flags):
0.75 s per meta-step (8 tasks x (4 + 4) prompts of 384 tokens, second order), so ~13 min for the
1000 steps plus ~15 s of preparation and compilation; 33 GiB of device memory at peak.
``python launch/bench_decoder.py --config configs/qwen2_mta.py --config.model.path=random:qwen2_0_5b``
measures it on your machine. Expected metric: not measured (no Qwen2 checkpoint has been available
to this project's runs).

Tool selection as in the paper: the prompt lists the item's 5 candidate tools and the query, the
target is the gold tool's name + eos (``mta_jax.tasks.prompts``). ``data.query_len`` is the sequence
length (prompt + target tokens), ``data.doc_len`` the most target tokens (48: ToolLens endpoint names
reach 44 tokens with a WordPiece tokenizer; training checks every train tool's name against it
before the first step and names the one that does not fit). Eval methods: ``zero_shot``,
``ft``, ``mta`` score every candidate name (constrained, total log-prob); ``<method>@norm`` is the
per-token variant and ``<method>@gen`` greedy generation + exact match (the paper's metric).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.eval_every = 0
    c.init_from = ""
    c.tasks_per_step = 8
    c.prefetch = 2

    c.model = ml_collections.ConfigDict(dict(kind="decoder", path=arg or "", dtype="bfloat16", remat=True))
    c.loss = ml_collections.ConfigDict(dict(scale=1.0))  # unused by the decoder loss
    c.data = ml_collections.ConfigDict(dict(
        datasets=("metatool", "toollens"), doc_style="name_desc", query_len=384, doc_len=48))
    c.episode = ml_collections.ConfigDict(dict(
        tools_per_episode=8, support=4, query=4, candidates=5, regime="mixed", dataset_weighting="uniform",
        support_labels="gold", support_source="items", query_tools="shared"))
    c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets=r"layers/attn/(q|v)/kernel",
                                            first_layer=0))
    c.meta = ml_collections.ConfigDict(dict(
        algorithm="maml", inner_steps=1, inner_lr=0.01, first_order=False, remat=True,
        inner_optimizer="sgd", inner_clip=0.0, inner_hvp="reverse",  # "forward": InnerConfig.hvp
        adapt_pattern="", imaml_lambda=1.0, imaml_cg_steps=5,
        task_chunk=0, support_weight=0.0))
    c.outer = ml_collections.ConfigDict(dict(lr=2e-4, warmup=50, clip=1.0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    c.eval = ml_collections.ConfigDict(dict(
        methods=("random", "bm25", "zero_shot", "mta", "mta@gen"),
        sets=("metatool/test_sd", "metatool/test_cd", "toollens/test_sd", "toollens/test_cd",
              "bfcl/multiple", "bfcl/live_multiple", "seal_tools/test_in_domain", "api_bank/level-1"),
        max_len=1024, adapt_shots=5, batch_size=32,
        protocol_seeds=(0, 1, 2, 3, 4),  # MetaTool / ToolLens seed files averaged (fewer: cheaper)
        max_items=0))  # > 0: score a fixed random subset of this many items per set file (0: all)
    return c
