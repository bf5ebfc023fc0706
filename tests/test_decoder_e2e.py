"""Decoder tool selection end to end: prompts, target loss, constrained scoring, greedy decoding, train + eval, PEFT export."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from safetensors.numpy import load_file

from mta_jax import meta
from mta_jax.data import render
from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import adapt as adapt_lib
from mta_jax.eval import decoder_methods, report, sets
from mta_jax.eval.sets import EvalItem, EvalSet
from mta_jax.meta import losses
from mta_jax.model import decoder, generate
from mta_jax.model import lora as lora_lib
from mta_jax.tasks import prompts
from mta_jax.train import evaluate, loop, workloads
from mta_jax.train import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = [("weather_forecast", "Get the weather forecast for a city"),
         ("calculator", "Evaluate arithmetic expressions"),
         ("translate_text", "Translate text between languages"),
         ("stock_price", "Live stock prices for a ticker symbol")]


def tiny_decoder_config(**overrides):
    return load_config("tiny_decoder", **overrides)


@pytest.fixture(scope="module")
def backbone():
    bb = workloads.load_decoder_backbone(workloads.RANDOM_TINY_DECODER, "float32", False)
    # At init scale every next-token distribution is nearly flat and argmaxes are ties. Every weight
    # x4 gives O(1) logits (std ~1.8) that depend on the context (attention matters), so a wrong
    # prompt, order, position or padding changes the scores (checked below); at x2.5 greedy
    # continuations repeat one token. Scaling only the embeddings (x50) made the model ignore its
    # context: another query moved constrained scores of ~-130 by 0.01.
    base = jax.tree.map(lambda x: x * 4.0, bb.base)
    return bb.name, bb.cfg, base, bb.tok, bb.eos_id


def _tools():
    return [Tool(f"t{i}", n, d, None, "x") for i, (n, d) in enumerate(TOOLS)]


def test_prompt_target_span_is_exactly_the_gold_name(backbone):
    _, _, _, tok, eos = backbone
    tools = _tools()
    prompt, target = render.decoder_prompt("convert 5 euros", tools[:3], tools[1])
    enc = prompts.PromptEncoder(tok, 160, 12, eos).pairs([prompt], [target])
    span = enc.ids[0][enc.target_mask[0] == 1].tolist()
    assert span == tok.tokenize([" calculator"], add_special_tokens=False)[0] + [eos]
    n = int(enc.mask[0].sum())
    assert enc.target_mask[0, n - len(span):n].all() and not enc.target_mask[0, :n - len(span)].any()
    assert enc.ids[0, :n - len(span)].tolist() == tok.tokenize([prompt])[0]  # untouched prompt
    assert not enc.truncated[0] and (enc.ids[0, n:] == tok.pad_id).all()


def test_truncation_cuts_the_prompt_front_never_the_target(backbone):
    _, _, _, tok, eos = backbone
    tools = _tools()
    prompt, target = render.decoder_prompt("what is 17 times 23", tools, tools[1])
    full = tok.tokenize([prompt])[0]
    tgt = tok.tokenize([target], add_special_tokens=False)[0] + [eos]
    L = len(full) + len(tgt) - 10
    enc = prompts.PromptEncoder(tok, L, 12, eos).pairs([prompt], [target])
    assert enc.truncated[0] and enc.mask[0].all()
    assert enc.ids[0][enc.target_mask[0] == 1].tolist() == tgt
    kept = enc.ids[0][:L - len(tgt)].tolist()
    # BERT tokenizer: [CLS] stays first, [SEP] last; the 10 dropped tokens are the first text tokens.
    assert kept == full[:1] + full[11:]
    with pytest.raises(ValueError, match="max_target"):
        prompts.PromptEncoder(tok, L, 2, eos).pairs([prompt], [target])


def test_target_loss_matches_numpy_from_forward_logits(backbone):
    _, cfg, base, tok, eos = backbone
    tools = _tools()
    pairs = [render.decoder_prompt(q, tools, tools[g]) for q, g in (
        ("rain in Oslo?", 0), ("2+2", 1), ("say hello in French", 2), ("price of AAPL", 3))]
    enc = prompts.PromptEncoder(tok, 96, 10, eos).pairs([p for p, _ in pairs], [t for _, t in pairs])
    assert not enc.truncated.any()
    ids = enc.ids.copy()
    # Row 2's target is the model's own greedy continuation (all right); row 3's too, except its last
    # token, the runner-up (all but one right). Set position by position: each token changes the next.
    fwd = jax.jit(decoder.forward, static_argnums=0)
    spans = {b: np.flatnonzero(enc.target_mask[b]) for b in (2, 3)}
    assert min(map(len, spans.values())) >= 3
    for k in range(max(map(len, spans.values()))):
        logits = np.asarray(fwd(cfg, base, ids, enc.mask))
        for b, pos in spans.items():
            if k < len(pos):
                ranked = np.argsort(logits[b, pos[k] - 1])
                ids[b, pos[k]] = ranked[-2] if (b == 3 and k == len(pos) - 1) else ranked[-1]
    batch = {"ids": ids, "mask": enc.mask, "target_mask": enc.target_mask}
    loss, aux = losses.DecoderTargetLoss(cfg, max_target=10)(None, base, batch)
    logits = np.asarray(decoder.forward(cfg, base, ids, enc.mask), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll, count, all_right, n_right = 0.0, 0, [], []
    for b in range(len(pairs)):
        pos = np.flatnonzero(enc.target_mask[b])
        nll -= sum(logp[b, t - 1, ids[b, t]] for t in pos)
        count += len(pos)
        right = [logits[b, t - 1].argmax() == ids[b, t] for t in pos]
        all_right.append(all(right))
        n_right.append(sum(right))
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
    # The construction worked (rows 0-1 are names the untrained model does not produce), so acc is
    # strictly between 0 and 1, and counting any-token or first-token hits would give more.
    assert all_right == [False, False, True, False] and n_right[3] == len(spans[3]) - 1
    assert float(aux["acc"]) == np.mean(all_right) == 0.25


def _eval_set(items, dataset="mini"):
    return EvalSet("mini/test", dataset, Catalogue(tuple(_tools())), tuple(items))


def test_constrained_scoring_picks_the_max_sequence_logprob(backbone):
    _, cfg, base, tok, eos = backbone
    tools = _tools()
    item = EvalItem("a", "price of AAPL", ("t3",), ("t0", "t3", "t2"))
    scores = decoder_methods.constrained_scorer(cfg, base, tok, eos_id=eos, max_len=256,
                                                batch_size=4)([_eval_set([item])])[0][0]
    norm = decoder_methods.constrained_scorer(cfg, base, tok, eos_id=eos, max_len=256, batch_size=4,
                                              normalize=True)([_eval_set([item])])[0][0]
    # The prompt lists the candidates in the scorer's seeded order (here not the shipped one).
    shown = np.array(item.candidates)[decoder_methods.display_order(item.id, len(item.candidates))]
    assert shown.tolist() != list(item.candidates)
    prompt, _ = render.decoder_prompt(item.query, [tools[int(t[1:])] for t in shown])
    ref, lengths = [], []
    for c in (0, 3, 2):  # built by hand, scored by the model's full-logit reference
        p = tok.tokenize([prompt])[0]
        t = tok.tokenize([" " + tools[c].name], add_special_tokens=False)[0] + [eos]
        ids = np.array([p + t], np.int32)
        tm = np.array([[0] * len(p) + [1] * len(t)], np.int32)
        ref.append(float(decoder.sequence_logprob(cfg, base, ids, np.ones_like(ids), tm)[0]))
        lengths.append(len(t))
    np.testing.assert_allclose(scores, ref, rtol=1e-5)
    np.testing.assert_allclose(norm, np.array(ref) / lengths, rtol=1e-5)
    assert len(set(np.round(ref, 4))) == 3 and int(np.argmax(scores)) == int(np.argmax(ref))
    # The model reads its context: another query (same id, so the same listing order) moves the
    # scores by 3.95 (the embedding-only x50 scaling: by 0.01).
    other = EvalItem("a", "will it rain in Oslo tomorrow", ("t0",), item.candidates)
    moved = decoder_methods.constrained_scorer(cfg, base, tok, eos_id=eos, max_len=256,
                                               batch_size=4)([_eval_set([other])])[0][0]
    assert np.abs(moved - scores).max() > 1.0


def test_greedy_equals_argmax_unrolled_forward(backbone):
    _, cfg, base, tok, _ = backbone
    rng = np.random.default_rng(0)
    lengths, width, n = (7, 4, 9), 9, 5
    rows = [rng.integers(1000, 2000, k).tolist() for k in lengths]
    ref = []
    # The model reads its context: the first greedy token differs from the one after the last token alone.
    one = jnp.ones((1, 1), jnp.int32)
    alone = [int(jnp.argmax(decoder.forward(cfg, base, jnp.array([r[-1:]]), one)[0, -1])) for r in rows]
    for r in rows:
        seq = list(r)
        for _ in range(n):
            logits = decoder.forward(cfg, base, jnp.array([seq]), jnp.ones((1, len(seq)), jnp.int32))
            seq.append(int(jnp.argmax(logits[0, -1])))
        ref.append(seq[len(r):])
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    tokens, valid = generate.greedy(cfg, base, ids, mask, n, None)
    assert np.asarray(tokens).tolist() == ref and np.asarray(valid).all()
    assert all(ref[i][0] != alone[i] for i in range(3))
    assert all(len(set(x)) > 2 for x in ref)  # not one repeated token
    # Row 1 stops after its 2nd token; the others run on, unaffected.
    eos = ref[1][1]
    tokens, valid = generate.greedy(cfg, base, ids, mask, n, eos)
    for i in range(3):
        stop = ref[i].index(eos) + 1 if eos in ref[i] else n
        assert np.asarray(tokens)[i, :stop].tolist() == ref[i][:stop]
        assert np.asarray(valid)[i].tolist() == [j < stop for j in range(n)]
    with pytest.raises(ValueError, match="left padded"):
        generate.greedy(cfg, base, ids[:, ::-1], mask[:, ::-1], n, None)


def _write_dir(root: pathlib.Path, candidates) -> pathlib.Path:
    root.mkdir()
    (root / "tools.jsonl").write_text("".join(json.dumps({"tool_id": f"t{i}", "name": n, "description": d,
                                                          "parameters": None, "category": "x"}) + "\n"
                                              for i, (n, d) in enumerate(TOOLS)))
    recs = [("a", "will it rain in Oslo tomorrow", ["t0"], ["t0", "t1", "t2"]),
            ("b", "what is 17 times 23", ["t1"], ["t3", "t1"]),
            ("c", "say hello in French", ["t2"], ["t2", "t3", "t0", "t1"]),
            ("d", "nothing to do", [], ["t0", "t1"])]
    (root / "test.jsonl").write_text("".join(json.dumps(
        {"id": i, "query": q, "gold": g, "candidates": c if candidates else None, "meta": {}}) + "\n"
        for i, q, g, c in recs))
    return root


def test_prompts_list_candidates_in_a_seeded_order_not_the_shipped_one():
    """Shipped lists that always put the gold first must not show it first: position would answer."""
    tools = [Tool(f"t{i}", f"tool{i}", f"does thing {i}") for i in range(5)]
    items = tuple(EvalItem(f"q{k}", f"request {k}", ("t0",), tuple(f"t{i}" for i in range(5))) for k in range(40))
    (rows,) = decoder_methods.item_texts((EvalSet("toy/first", "toy", Catalogue(tools), items),))
    shown_first = []
    for it, (prompt, labels) in zip(items, rows):
        assert labels == [f" tool{i}" for i in range(5)]  # scores stay in candidate order
        listed = [line[2:].split(":")[0] for line in prompt.splitlines() if line.startswith("- ")]
        assert sorted(listed) == [f"tool{i}" for i in range(5)]
        assert listed == [f"tool{i}" for i in decoder_methods.display_order(it.id, 5)]
        shown_first.append(listed[0] == "tool0")
    assert 2 <= sum(shown_first) <= 20  # about 1 in 5, never the shipped "always first"


def test_a_generated_answer_naming_no_candidate_abstains():
    """An abstention counts wrong in every metric: tests/test_eval_metrics.py."""
    np.testing.assert_array_equal(decoder_methods.answer_scores("b", ["a", "b", "c"]), [0, 1, 0])
    miss = decoder_methods.answer_scores("z", ["a", "b"])
    assert np.isneginf(miss).all()


def test_train_and_eval_end_to_end(tmp_path, data_dir, monkeypatch):
    wd = tmp_path / "run"
    config = tiny_decoder_config(steps=2)
    state = loop.train(config, wd, str(data_dir))
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["outer/loss"])
    # Random weights over a ~30k vocabulary: the loss starts near log(V).
    assert abs(rows[0]["outer/loss"] - np.log(30522)) < 1.5
    assert int(jax.device_get(state.step)) == 2
    mini = _write_dir(tmp_path / "mini", candidates=True)
    methods = ("random", "zero_shot", "mta", "mta@norm", "mta@gen", "mta:1", "mta:0", "mta:0.5@norm")
    scales = {}  # the LoRA scale each constrained method scores with (WiSE interpolation: A x trained)
    real = decoder_methods.SharedBottomScorers.scorer
    monkeypatch.setattr(decoder_methods.SharedBottomScorers, "scorer", lambda self, name, lora=None, **kw: (
        scales.__setitem__(name, None if lora is None else lora.scale) or real(self, name, lora, **kw)))
    results = evaluate.run(config, wd, methods, [str(mini)], data_dir=str(data_dir), log=lambda s: None)
    trained = scales["mta"]
    assert trained > 0 and scales == {"zero_shot": None, "mta": trained, "mta@norm": trained, "mta:1": trained,
                                      "mta:0": 0.0, "mta:0.5@norm": 0.5 * trained}
    assert results["mini/test"]["mta:1"]["accuracy"] == results["mini/test"]["mta"]["accuracy"]
    assert results["mini/test"]["mta:0"]["accuracy"] == results["mini/test"]["zero_shot"]["accuracy"]
    stored = report.read_results(wd / "eval" / "results.json")  # validates the schema
    assert stored == json.loads(json.dumps(results))
    assert set(results) == {"mini/test"} and set(results["mini/test"]) == set(methods)
    for m in methods:
        e = results["mini/test"][m]
        assert e["n"] == 3 and e["skipped_empty_gold"] == 1
    # mta's accuracy recomputed: the run's restored LoRA scores the 3 gold items, top-1 by hand.
    (mini_set,) = sets.build_sets([str(mini)], data_dir)["mini/test"]
    bb = workloads.load_decoder_backbone(config.model.path, config.model.dtype, False)
    lora = loop.restore_trained(wd, bb.base, bb.name)[2]
    scores = decoder_methods.constrained_scorer(bb.cfg, bb.base, bb.tok, lora, eos_id=bb.eos_id,
                                                max_len=config.eval.max_len,
                                                batch_size=config.eval.batch_size)([mini_set])[0]
    assert [it.id for it in mini_set.items] == ["a", "b", "c"]
    assert all(len(set(s)) == len(s) for s in scores)  # no ties: top-1 is the argmax
    hits = [it.candidates[int(np.argmax(s))] in it.gold for it, s in zip(mini_set.items, scores)]
    assert results["mini/test"]["mta"]["accuracy"] == sum(hits) / 3
    pool = _write_dir(tmp_path / "pool", candidates=False)
    with pytest.raises(ValueError, match="pool/test.*candidates=None"):
        evaluate.run(config, wd, ("zero_shot",), [str(pool)], data_dir=str(data_dir), log=lambda s: None)
    # Test-time adaptation through launch-level evaluation: k-shot needs several items per tool.
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "tools.jsonl").write_text((mini / "tools.jsonl").read_text())
    (toy / "test.jsonl").write_text("".join(json.dumps(
        {"id": it.id, "query": it.query, "gold": list(it.gold), "candidates": list(it.candidates), "meta": {}}) + "\n"
        for it in _toy_group()[0].items))
    adapted = ("mta", "mta_adapt", "ft_adapt", "mta_docs@gen")
    results = evaluate.run(config, wd, adapted, [str(toy)], data_dir=str(data_dir), log=lambda s: None)
    assert set(results["toy/test"]) == set(adapted) and all(results["toy/test"][m]["n"] == 8 for m in adapted)
    with pytest.raises(ValueError, match="mta_tta .*not implemented for decoder"):
        evaluate.run(config, wd, ("mta_tta",), [str(toy)], data_dir=str(data_dir), log=lambda s: None)
    # launch/select.py on a decoder run: every catalogue tool ranked by its name's constrained score.
    queries = ["will it snow in Bergen", "what is 12 plus 30"]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "select.py"), f"--tools={mini}",
                           *[f"--query={q}" for q in queries], f"--workdir={wd}", "--top_k=3", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    catalogue = mini_set.catalogue
    items = [sets.EvalItem(f"query{i}", q, (), tuple(t.tool_id for t in catalogue.tools))
             for i, q in enumerate(queries)]
    want = decoder_methods.constrained_scorer(bb.cfg, bb.base, bb.tok, lora, eos_id=bb.eos_id,
                                              max_len=config.eval.max_len, batch_size=config.eval.batch_size)(
        [sets.EvalSet("select", "select", catalogue, tuple(items))])[0]
    assert [x["query"] for x in lines] == queries
    for x, row in zip(lines, want):
        assert [r["tool_id"] for r in x["ranking"]] == [catalogue.tools[i].tool_id for i in np.argsort(-row)[:3]]
        np.testing.assert_allclose([r["score"] for r in x["ranking"]], np.sort(row)[::-1][:3], atol=2e-4)


def test_export_peft_launch_on_tiny_encoder_run(tmp_path, data_dir):
    wd, out = tmp_path / "enc", tmp_path / "peft"
    env = {**os.environ}
    for script, args in (("train.py", ["--config", str(REPO / "configs/tiny.py"), "--workdir", str(wd),
                                       "--config.steps=1", "--config.log_every=1", f"--data_dir={data_dir}"]),
                         ("export_peft.py", [f"--workdir={wd}", f"--out={out}"])):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2 and conf["base_model_name_or_path"] == "random-tiny"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    base = workloads.load_backbone("random-tiny", "float32", False)[2]
    _, _, lora = loop.restore_trained(wd, base, "random-tiny")
    a = np.asarray(lora.tree["layers"]["attn"]["q"]["a"])  # first_layer=1 of 2: one adapted layer
    key = "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"
    np.testing.assert_array_equal(tensors[key], a[0].T)
    assert len(tensors) == 2 * 6  # q, k, v, o, up, down on one layer, A and B each


def test_random_presets_have_the_real_shapes_in_the_run_dtype(monkeypatch):
    cfg = workloads.random_decoder_config("random:qwen2_0_5b", "bfloat16", "full")
    assert cfg == dataclasses.replace(decoder.DecoderConfig.qwen2_0_5b(), dtype="bfloat16",
                                      param_dtype="bfloat16", remat="full")
    with pytest.raises(ValueError, match=r"unknown random preset 'qwen9'.*random:llama3_8b, random:qwen2_0_5b"):
        workloads.random_decoder_config("random:qwen9", "float32", False)
    # Loading: a small preset stands in for the real ones (0.5B / 8B parameters), same code path.
    small = decoder.DecoderConfig(vocab_size=40_000, hidden_size=16, num_layers=2, num_heads=2,
                                  num_kv_heads=1, head_dim=8, intermediate_size=24, arch="llama")
    monkeypatch.setitem(workloads.RANDOM_PRESETS, "small", lambda: small)
    bb = workloads.load_decoder_backbone("random:small", "bfloat16", False)
    assert bb.name == "random:small" and bb.cfg.num_layers == 2 and bb.cfg.dtype == "bfloat16"
    expected = jax.eval_shape(lambda k: decoder.init_params(bb.cfg, k), jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), bb.base) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), expected)
    assert bb.base["embed"].dtype == jnp.bfloat16 and float(jnp.std(bb.base["embed"].astype(jnp.float32))) > 0.01
    assert bb.eos_id == bb.tok.token_to_id("[SEP]") and bb.tok.vocab_size <= small.vocab_size
    monkeypatch.setitem(workloads.RANDOM_PRESETS, "small", lambda: dataclasses.replace(small, vocab_size=1000))
    with pytest.raises(ValueError, match=r"random:small: MiniLM's tokenizer has 30522 ids.*vocab_size=1000"):
        workloads.load_decoder_backbone("random:small", "float32", False)


def _packing_items(tok):
    """Three items and a ``max_len`` at which item a packs, b fits only one candidate per row and c
    is cut from the front: ``(eval_set, max_len, texts, prompt lengths, target lengths)``."""
    words = "please find me the tool that can help with this request about".split()
    queries = [" ".join(words[:4]), " ".join(words * 2), " ".join(words * 6)]
    items = [EvalItem("a", queries[0], ("t1",), ("t0", "t1", "t2")),
             EvalItem("b", queries[1], ("t3",), ("t3", "t1")),
             EvalItem("c", queries[2], ("t2",), ("t2", "t0", "t3", "t1"))]
    eval_set = _eval_set(items)
    texts = decoder_methods.item_texts([eval_set])[0]
    prompt_len = [len(tok.tokenize([p])[0]) for p, _ in texts]
    target_len = [[len(tok.tokenize([t], add_special_tokens=False)[0]) + 1 for t in labels] for _, labels in texts]
    max_len = prompt_len[1] + max(target_len[1])  # b fits alone, not packed; c is cut; a packs
    assert prompt_len[0] + sum(target_len[0]) <= max_len < prompt_len[1] + sum(target_len[1])
    assert prompt_len[2] + min(target_len[2]) > max_len
    return eval_set, max_len, texts, prompt_len, target_len


def test_packed_candidates_equal_one_row_per_candidate(backbone, monkeypatch):
    """All of an item's candidates scored in one row (prompt once, then each target in its own
    segment) give the scores of one (prompt, target) row each; items too long to pack take the
    per-candidate path, cut from the front exactly like it."""
    _, cfg, base, tok, eos = backbone
    eval_set, max_len, texts, prompt_len, target_len = _packing_items(tok)
    packed = []
    real_pack = decoder_methods._pack
    monkeypatch.setattr(decoder_methods, "_pack", lambda prompt, *a: packed.append(prompt) or real_pack(prompt, *a))
    for normalize in (False, True):
        scores = decoder_methods.constrained_scorer(cfg, base, tok, eos_id=eos, max_len=max_len, batch_size=8,
                                                    normalize=normalize)([eval_set])[0]
        enc = prompts.PromptEncoder(tok, max_len, max(map(max, target_len)), eos)
        for (prompt, labels), got in zip(texts, scores):
            e = enc.pairs([prompt] * len(labels), labels)
            ref = np.asarray(decoder.sequence_logprob(cfg, base, e.ids, e.mask, e.target_mask))
            if normalize:
                ref = ref / e.target_mask.sum(-1)
            np.testing.assert_allclose(got, ref, rtol=2e-5)
        assert e.truncated.all()  # item c's rows were cut from the front
    assert [len(p) for p in packed] == [prompt_len[0]] * 2  # only item a was packed (once per call)


def test_shared_bottom_scorers_equal_each_method_alone(backbone):
    """Several adapters scored over one frozen-bottom pass give each adapter's own constrained
    scores (packed, per-candidate and cut rows; total and @norm), whichever member asks first."""
    _, cfg, base, tok, eos = backbone
    eval_set, max_len, _, _, _ = _packing_items(tok)

    def adapter(first_layer, seed):
        lcfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=r"layers/attn/(q|v)/kernel", first_layer=first_layer)
        lo = lora_lib.init_lora(jax.random.key(seed), base, lcfg)
        leaves, tdef = jax.tree.flatten(lo.tree)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return lora_lib.LoRAParams(jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape)
                                                              for x, k in zip(leaves, keys)]), lo.scale)

    top, lower = adapter(cfg.num_layers - 1, 3), adapter(cfg.num_layers - 2, 5)
    members = {"zero_shot": (None, False), "top": (top, False), "top@norm": (top, True), "lower": (lower, False)}
    lines = []
    shared = decoder_methods.SharedBottomScorers(cfg, base, tok, eos_id=eos, max_len=max_len, batch_size=8,
                                                 log=lines.append, log_every=0.0)
    scorers = {m: shared.scorer(m, lo, normalize=n) for m, (lo, n) in members.items()}
    assert decoder_methods.shared_split(cfg, [lo for lo, _ in members.values()]) == cfg.num_layers - 2
    group = (eval_set,)
    for m in ("lower", "zero_shot", "top@norm", "top"):  # not the registration order
        got = scorers[m](group)[0]
        lo, n = members[m]
        want = decoder_methods.constrained_scorer(cfg, base, tok, lo, eos_id=eos, max_len=max_len, batch_size=8,
                                                  normalize=n)([eval_set])[0]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, err_msg=m)
    assert not shared._pending  # every member took its scores
    # One progress line per compiled call (log_every=0), counting up to every scoring row once.
    counts = [line.split(": ")[1].split(" ")[0].split("/") for line in lines]
    n_rows, total = [int(done) for done, _ in counts], int(counts[-1][1])
    assert len(lines) >= 2 and n_rows == sorted(n_rows) and n_rows[-1] == total
    assert lines[-1].startswith(f"{eval_set.name}, 4 method(s): {total}/{total} rows") and lines[-1].endswith("~0s left")
    alone = [decoder_methods.constrained_scorer(cfg, base, tok, lo, eos_id=eos, max_len=max_len, batch_size=8)(
        [eval_set])[0][0] for lo in (None, top, lower)]
    assert min(np.abs(a - b).max() for a in alone for b in alone if a is not b) > 1e-2  # the adapters differ


@pytest.fixture(scope="module")
def adapt_setup(backbone):
    """The scaled tiny decoder as a backbone, tiny_decoder's settings, and meta-parameters whose LoRA
    already moves the model (B != 0), so an inner step changes the scores."""
    name, cfg, base, tok, eos = backbone
    s = state_lib.settings_from_config(tiny_decoder_config())
    lora = lora_lib.init_lora(jax.random.key(0), base, s.lora)
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    meta_params = meta.init_state(lora, s.meta, loop.make_outer_optimizer(s)).params
    bb = workloads.DecoderBackbone(name, cfg, base, tok, eos)
    return s, meta_params, bb


def _decoder_adapter(adapt_setup, **kw):
    s, meta_params, bb = adapt_setup
    kw = {"shots": 2, "max_len": 192, "batch_size": 8, **kw}
    shots = kw.pop("shots")
    return adapt_lib.DecoderAdaptScorer(bb, s, meta_params, shots, **kw)


def _toy_group():
    cat = Catalogue(tuple(_tools()))
    items = [EvalItem(f"a{k}", f"will it rain in city {k}", ("t0",), ("t1", "t0", "t3")) for k in range(4)]
    items += [EvalItem(f"b{k}", f"what is {k} times 7", ("t1",), ("t1", "t2", "t0")) for k in range(4)]
    return (EvalSet("toy/test", "toy", cat, tuple(items), seed=0),)


def test_decoder_adaptation_trains_on_other_items_gold_names(adapt_setup, monkeypatch):
    """mta_adapt for the decoder: the support rows are other-fold items' prompts followed by their
    gold tool's name + eos; the adapted LoRA is exactly the inner loop on that batch, and it scores
    the fold with the constrained scorer (recomputed here by hand). So no scored item's label is
    read. (The encoder's same-query invariance test does not carry over: a decoder prompt lists the
    candidates in an order seeded by the item id, so two items with one query text score apart.)"""
    s, meta_params, bb = adapt_setup
    scorer = _decoder_adapter(adapt_setup)
    seen = []
    original = scorer._support

    def recording(eval_set, items):
        batch = original(eval_set, items)
        seen.append((list(items), batch))
        return batch

    monkeypatch.setattr(scorer, "_support", recording)
    group = _toy_group()
    scores = scorer(group)[0]
    assert len(seen) == 2 and all(np.isfinite(x).all() and x.shape == (3,) for x in scores)
    ids0 = {it.id for it in seen[0][0]}
    assert ids0 and ids0.isdisjoint({it.id for it in seen[1][0]})
    items, batch = seen[0]
    assert batch["ids"].shape[0] == 8 and batch["ids"].shape[0] > len(items)  # padded rows ...
    assert not batch["target_mask"][len(items):].any()                       # ... carry no target
    for r, it in enumerate(items):
        span = batch["ids"][r][batch["target_mask"][r] == 1].tolist()
        name = TOOLS[int(it.gold[0][1:])][0]
        assert span == bb.tok.tokenize([" " + name], add_special_tokens=False)[0] + [bb.eos_id]
    # Fold 0's items are scored by the LoRA adapted on fold 1's support batch.
    scored0 = [i for i, it in enumerate(group[0].items) if it.id not in {x.id for x in seen[1][0]}]
    b1 = {k: v for k, v in seen[1][1].items() if k != "max_target"}
    loss = losses.DecoderTargetLoss(bb.cfg, max_target=seen[1][1]["max_target"])
    lora = meta.adapt_for_eval(meta_params, bb.base, b1, s.meta, loss, has_aux=True)
    fold = dataclasses.replace(group[0], items=tuple(group[0].items[i] for i in scored0))
    ref = decoder_methods.constrained_scorer(bb.cfg, bb.base, bb.tok, lora, eos_id=bb.eos_id, max_len=192,
                                             batch_size=8)([fold])[0]
    for i, r in zip(scored0, ref):
        np.testing.assert_allclose(scores[i], r, rtol=1e-5, atol=1e-5)
    unadapted = decoder_methods.constrained_scorer(bb.cfg, bb.base, bb.tok, meta_params, eos_id=bb.eos_id,
                                                   max_len=192, batch_size=8)([fold])[0]
    assert max(np.abs(a - b).max() for a, b in zip(ref, unadapted)) > 1e-3  # adaptation moved them


def test_decoder_adaptation_options(adapt_setup):
    with pytest.raises(ValueError, match="support must be one of"):
        _decoder_adapter(adapt_setup, support="unlabelled")
    docs = _decoder_adapter(adapt_setup, support="docs")(_toy_group())[0]
    gen = _decoder_adapter(adapt_setup, variant="@gen")(_toy_group())[0]
    assert all(np.isfinite(x).all() for x in docs)
    assert all(set(np.unique(x)) <= {0.0, 1.0} or np.isneginf(x).all() for x in gen)
