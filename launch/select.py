"""Ranks the tools of a tools.jsonl for queries with a trained workdir (or the pretrained encoder).

  python launch/select.py --tools path/to/tools.jsonl --query "book me a table for two" \
      [--workdir runs/minilm_mta] [--top_k 5] [--json]

Without --workdir the pretrained backbone ranks zero-shot. An encoder run ranks by cosine; a decoder
run (``model.kind="decoder"``) lists every tool in its prompt and ranks by the log-probability of
each tool's name + eos (its ``mta`` score; ``--max_len`` bounds the prompt, cut from the front).
"""
import json
import pathlib
import sys

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags  # noqa: E402

from launch import _common  # noqa: E402

_TOOLS = flags.DEFINE_string("tools", None, "A tools.jsonl (normalized format) or a folder holding one.")
_QUERY = flags.DEFINE_multi_string("query", None, "A user request (repeat for several).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run to use (default: zero-shot backbone).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many tools to print per query.")
_JSON = flags.DEFINE_boolean("json", False, "Print one JSON object per query instead of a table.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Decoder runs: prompt + name tokens (0: the run's eval.max_len).")
flags.mark_flags_as_required(["tools", "query"])


def main(argv):
    _common.start(argv)
    from mta_jax.data import records
    from mta_jax.eval import encoders
    from mta_jax.eval import select
    from mta_jax.train import loop
    from mta_jax.train import workloads

    path = pathlib.Path(_TOOLS.value)
    catalogue = records.load_catalogue(path / records.TOOLS_FILE if path.is_dir() else path)
    model_path, lora, first, style, cfg_json = "", None, None, "name_desc", None
    if _WORKDIR.value:
        cfg_json = json.loads((pathlib.Path(_WORKDIR.value) / "config.json").read_text(encoding="utf-8"))
        model_path, style = cfg_json["model"]["path"], cfg_json["data"]["doc_style"]
    if cfg_json is not None and cfg_json["model"].get("kind", "encoder") == "decoder":
        from mta_jax.eval import decoder_methods

        bb = workloads.load_decoder_backbone(model_path, cfg_json["model"]["dtype"], False)
        lora = loop.restore_trained(_WORKDIR.value, bb.base, bb.name)[2]
        scorer = decoder_methods.constrained_scorer(
            bb.cfg, bb.base, bb.tok, lora, eos_id=bb.eos_id, max_len=_MAX_LEN.value or cfg_json["eval"]["max_len"],
            batch_size=cfg_json["eval"]["batch_size"])
        ranked = select.rank_tools_by_scorer(scorer, catalogue, _QUERY.value, top_k=_TOP_K.value)
    else:
        name, cfg, base, tok = workloads.load_backbone(model_path, "float32", False)
        if _WORKDIR.value:
            s, _, lora = loop.restore_trained(_WORKDIR.value, base, name)
            first = s.lora.first_layer
        bank = encoders.SharedBottomEncoder(cfg, base, tok,
                                            first_layer=cfg.num_layers - 1 if first is None else first)
        ranked = select.rank_tools(bank.embed_fn(lora), catalogue, _QUERY.value, doc_style=style,
                                   top_k=_TOP_K.value)
    for query, rows in zip(_QUERY.value, ranked):
        if _JSON.value:
            print(json.dumps({"query": query, "ranking": [{"tool_id": t, "score": round(sc, 4)} for t, sc in rows]}))
            continue
        print(f"query: {query}")
        for rank, (tool_id, score) in enumerate(rows, 1):
            print(f"  {rank:2d}. {score:.3f}  {tool_id}  {catalogue[tool_id].description[:70]}")


if __name__ == "__main__":
    app.run(main)
