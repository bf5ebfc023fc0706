"""Parsers for the benchmarks' raw public formats, producing the same Catalogue/QueryRecords as ``normalized/``."""
from __future__ import annotations

import ast
import csv
import json
import pathlib
import re
import types
from typing import Callable, Mapping

from mta_jax.data import records
from mta_jax.data.records import Catalogue, DataError, QueryRecord, Tool, where

Parsed = tuple[Catalogue, dict[str, list[QueryRecord]]]
_EMPTY = types.MappingProxyType({})


def _json(path: pathlib.Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, e.lineno)}: malformed JSON ({e.msg})") from None


def _dig(obj, loc: str, *keys):
    """``obj[k0][k1]...``, or a DataError naming ``loc`` and the path of keys that is missing."""
    for i, k in enumerate(keys):
        try:
            obj = obj[k]
        except (KeyError, IndexError, TypeError):
            path = "".join(f"[{x!r}]" for x in keys[: i + 1])
            raise DataError(f"{loc}: missing or malformed field {path}") from None
    return obj


def _record(rid: str, query: str, gold, cands, meta, cat: Catalogue, path, line) -> QueryRecord:
    obj = {"id": rid, "query": query, "gold": list(gold), "candidates": None if cands is None else list(cands),
           "meta": meta}
    return records.record_from_obj(obj, cat, path, line)  # the normalized loader's validation, same messages


# ---------------------------------------------------------------- MetaTool (HowieHwong/MetaTool)
def _metatool_domains(data_dir: pathlib.Path) -> dict[str, str]:
    # The derived clusters (data README §3) are not in the raw repo; read their membership when present.
    path = data_dir / "protocol" / "metatool" / "domains.json"
    if not path.is_file():
        return {}
    members = _json(path)["members"]
    members = ast.literal_eval(members) if isinstance(members, str) else members
    return {t: c for c, ts in members.items() for t in ts}


def parse_metatool(data_dir) -> Parsed:
    """MetaTool: ``plugin_des.json`` (+ merged tools' ``big_tool_des.json`` descriptions), ``all_clean_data.csv``
    (single-tool; identical query texts merged into multi-gold, as the normalized copy does) and
    ``multi_tool_query_golden.json``. Domains come from ``protocol/metatool/domains.json`` if present."""
    data_dir = pathlib.Path(data_dir)
    raw = data_dir / "raw" / "metatool"
    plugins, merged = _json(raw / "plugin_des.json"), _json(raw / "big_tool_des.json")
    domains = _metatool_domains(data_dir)
    tools = []
    for tid in list(plugins) + [k for k in merged if k not in plugins]:
        desc = merged.get(tid, plugins.get(tid))
        if not isinstance(desc, str) or not desc.strip():
            raise DataError(f"{raw / 'plugin_des.json'} field {tid!r}: empty or non-string description")
        tools.append(Tool(tid, tid, desc, None, domains.get(tid), _EMPTY))
    cat = Catalogue(tools, source=str(raw / "plugin_des.json"))

    path = raw / "data" / "all_clean_data.csv"
    groups: dict[str, list] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header != ["Query", "Tool"]:
            raise DataError(f"{where(path, 1)}: expected header Query,Tool, got {header}")
        for row in reader:
            line = reader.line_num
            if len(row) != 2:
                raise DataError(f"{where(path, line)}: expected 2 columns, got {len(row)}")
            q, t = row
            if not q.strip():
                raise DataError(f"{where(path, line, 'Query')}: empty text")
            if t not in cat:
                raise DataError(f"{where(path, line, 'Tool')}: unknown tool_id {t!r}")
            g = groups.setdefault(q, [line, [], 0])
            g[2] += 1
            if t not in g[1]:
                g[1].append(t)
    single = [_record(f"metatool-single-{i}", q, gold, None,
                      {"source_rows": n, "conflicting_labels": len(gold) > 1}, cat, path, line)
              for i, (q, (line, gold, n)) in enumerate(groups.items())]

    path = raw / "data" / "multi_tool_query_golden.json"
    multi = []
    for i, obj in enumerate(_json(path)):
        if not isinstance(obj, dict) or "query" not in obj or "tool" not in obj:
            raise DataError(f"{path} entry {i}: expected an object with 'query' and 'tool'")
        multi.append(_record(f"metatool-multi-{i}", obj["query"], list(dict.fromkeys(obj["tool"])), None, {},
                             cat, f"{path} entry {i}", None))
    return cat, {"single_tool": single, "multi_tool": multi}


# ---------------------------------------------------------------- ToolLens (COLT, BEIR layout)
_TOOLLENS_DOC = re.compile(r"^category_name:(.*?), tool_name:(.*?), api_name:(.*?), api_description:(.*?), "
                           r"required_params: ", re.S)


def parse_toollens(data_dir) -> Parsed:
    """ToolLens in BEIR layout: ``corpus.jsonl`` (flattened RapidAPI docs), ``queries.jsonl`` and
    ``qrels/{train,test}.tsv``; records keep the qrels' first-appearance order and gold order."""
    raw = pathlib.Path(data_dir) / "raw" / "toollens"
    path = raw / "corpus.jsonl"
    tools = []
    for n, obj in records.iter_jsonl(path):
        text = records.require_text(obj, "text", path, n)
        tid = records.require_text(obj, "_id", path, n)
        m = _TOOLLENS_DOC.match(text)
        if m is None:
            raise DataError(f"{where(path, n, 'text')}: not a 'category_name:..., tool_name:..., api_name:..., "
                            "api_description:..., required_params: ...' document")
        category, tool_name, api_name, desc = m.groups()
        tools.append(Tool(tid, api_name, desc, None, category,
                          types.MappingProxyType({"tool_name": tool_name, "doc_text": text})))
    cat = Catalogue(tools, source=str(path))
    path = raw / "queries.jsonl"
    queries: dict[str, tuple[str, int]] = {}
    for n, o in records.iter_jsonl(path):
        qid = records.require_text(o, "_id", path, n)
        if qid in queries:
            raise DataError(f"{where(path, n, '_id')}: duplicate query id {qid!r} (first at line {queries[qid][1]})")
        queries[qid] = (records.require_text(o, "text", path, n), n)
    out = {}
    for split in ("train", "test"):
        path = raw / "qrels" / f"{split}.tsv"
        gold: dict[str, list] = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                parts = line.rstrip("\n").split("\t")
                if n == 1 and parts[0] == "query-id":
                    continue
                if len(parts) != 3:
                    raise DataError(f"{where(path, n)}: expected query-id, corpus-id, score")
                qid, tid, score = parts
                if qid not in queries:
                    raise DataError(f"{where(path, n, 'query-id')}: unknown query {qid!r}")
                try:
                    relevant = float(score) > 0  # BEIR qrels: a score of 0 marks a judged non-relevant pair
                except ValueError:
                    raise DataError(f"{where(path, n, 'score')}: not a number: {score!r}") from None
                if not relevant:
                    continue
                g = gold.setdefault(qid, [n])
                if tid not in g:
                    g.append(tid)
        out[split] = [_record(q, queries[q][0], g[1:], None, {}, cat, path, g[0]) for q, g in gold.items()]
    return cat, out


# ---------------------------------------------------------------- BFCL v4 (gorilla)
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                   "live_parallel", "live_parallel_multiple", "irrelevance", "live_irrelevance", "live_relevance")


# Categories without a ground truth by design: no function should be called (gold = []).
BFCL_NO_ANSWER = ("irrelevance", "live_irrelevance", "live_relevance")


def parse_bfcl(data_dir) -> Parsed:
    """BFCL v4 ``BFCL_v4_<category>.json`` (JSONL) + ``possible_answer/``: per-example docs, tool id
    ``"<example id>::<function name>"``; query = the first turn's user message(s), system prompt in meta."""
    raw = pathlib.Path(data_dir) / "raw" / "bfcl"
    tools, out = [], {}
    answers: dict[str, dict[str, list]] = {}
    for c in BFCL_CATEGORIES:
        ans = raw / "possible_answer" / f"BFCL_v4_{c}.json"
        if c not in BFCL_NO_ANSWER and not ans.is_file():
            raise DataError(f"{ans}: missing; BFCL category {c!r} needs its possible answers for a gold tool")
        if ans.is_file():
            answers[c] = {}
            for n, o in records.iter_jsonl(ans):
                gt = o.get("ground_truth")
                if not isinstance(gt, list) or not all(isinstance(x, dict) for x in gt):
                    raise DataError(f"{where(ans, n, 'ground_truth')}: expected a list of {{name: args}}")
                answers[c][records.require_text(o, "id", ans, n)] = list(dict.fromkeys(k for x in gt for k in x))
    pending = []
    for c in BFCL_CATEGORIES:
        path = raw / f"BFCL_v4_{c}.json"
        for n, o in records.iter_jsonl(path):
            eid = records.require_text(o, "id", path, n)
            turns = o.get("question")
            if (not isinstance(turns, list) or not turns or not isinstance(turns[0], list)
                    or not all(isinstance(m, dict) for m in turns[0])):
                raise DataError(f"{where(path, n, 'question')}: expected a list of turns of message objects")
            users = [m.get("content", "") for m in turns[0] if m.get("role") == "user"]
            system = next((m.get("content") for m in turns[0] if m.get("role") == "system"), None)
            funcs = o.get("function")
            if not isinstance(funcs, list):  # may be empty: a few irrelevance examples offer no function
                raise DataError(f"{where(path, n, 'function')}: expected a list of function docs")
            ids = []
            for f in funcs:
                name = records.require_text(f, "name", path, n)
                tid = f"{eid}::{name}"
                tools.append(Tool(tid, name, records.require_text(f, "description", path, n, True),
                                  f.get("parameters"), None, _EMPTY))
                ids.append(tid)
            has = c in answers
            if has and eid not in answers[c]:
                raise DataError(f"{where(path, n, 'id')}: {eid!r} has no possible_answer entry")
            gold = [f"{eid}::{g}" for g in answers[c][eid]] if has else []
            meta = {"system": system, "n_turns": len(turns), "has_answer": has}
            pending.append((c, eid, "\n".join(users), gold, ids, meta, path, n))
    cat = Catalogue(tools, source=str(raw))
    for c, eid, q, gold, ids, meta, path, n in pending:
        out.setdefault(c, []).append(_record(eid, q, gold, ids, meta, cat, path, n))
    return cat, out


# ---------------------------------------------------------------- Seal-Tools
_API_LIST = re.compile(r"\napi_list = (\[.*\])\ntask_instruction = ", re.S)


def parse_seal_tools(data_dir) -> Parsed:
    """Seal-Tools: ``tool.jsonl``; ``{dev,test_in_domain}.jsonl`` (gold = called APIs, source order) with the
    shipped 5-tool candidate lists read from ``dataset_for_finetune/<split>.json`` prompts (``api_list``)."""
    raw = pathlib.Path(data_dir) / "raw" / "seal_tools"
    path = raw / "tool.jsonl"
    tools = []
    for n, o in records.iter_jsonl(path):
        tools.append(Tool(records.require_text(o, "api_name", path, n), o["api_name"],
                          records.require_text(o, "api_description", path, n, True),
                          {"properties": o.get("parameters"), "required": o.get("required")}, o.get("field"),
                          types.MappingProxyType({"responses": o.get("responses")})))
    cat = Catalogue(tools, source=str(path))
    out = {}
    for split in ("dev", "test_in_domain"):
        ft = raw / "dataset_for_finetune" / f"{split}.json"
        shipped = {}
        for i, ex in enumerate(_json(ft)):
            loc = f"{ft} entry {i}"
            prompt = _dig(ex, loc, "conversations", 0, "value")
            m = _API_LIST.search(prompt) if isinstance(prompt, str) else None
            if m is None:
                raise DataError(f"{loc} field 'conversations': no api_list in the prompt")
            try:
                apis = ast.literal_eval(m.group(1))
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{loc} field 'conversations': api_list is not a Python literal ({e})") from None
            shipped[_dig(ex, loc, "id")] = [_dig(a, f"{loc} api_list", "api_name") for a in apis]
        path = raw / f"{split}.jsonl"
        recs = []
        for n, o in records.iter_jsonl(path):
            rid = records.require_text(o, "id", path, n)
            calls = o.get("calling")
            if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
                raise DataError(f"{where(path, n, 'calling')}: expected a non-empty list of call objects")
            if rid not in shipped:
                raise DataError(f"{where(path, n, 'id')}: {rid!r} missing from {ft}")
            gold = list(dict.fromkeys(c.get("api") for c in calls))
            meta = {"difficulty": rid.split("-")[-2], "n_calls": len(calls)}
            recs.append(_record(rid, records.require_text(o, "query", path, n), gold, shipped[rid], meta, cat,
                                path, n))
        out[split] = recs
    return cat, out


# ---------------------------------------------------------------- API-Bank level-1
def parse_api_bank_level1(data_dir) -> Parsed:
    """API-Bank ``test-data/level-1-api.json``: query = dialogue ``input``, gold = the API named in
    ``expected_output``, candidates = the APIs described in the instruction. The catalogue holds only the
    APIs described there (the normalized copy adds lv3-train APIs)."""
    path = pathlib.Path(data_dir) / "raw" / "api_bank" / "test-data" / "level-1-api.json"
    tools: dict[str, Tool] = {}
    rows = []
    for i, ex in enumerate(_json(path)):
        loc = f"{path} entry {i}"
        instr = records.require_text(ex, "instruction", loc, None)
        if "API descriptions:\n" not in instr:
            raise DataError(f"{loc} field 'instruction': no 'API descriptions:' block")
        cands = []
        for line in instr.split("API descriptions:\n", 1)[1].strip().splitlines():
            try:
                api = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{loc} field 'instruction': bad API description JSON ({e.msg})") from None
            name = records.require_text(api, "name", loc, None)
            tools.setdefault(name, Tool(name, name, api.get("description") or "", api.get("input_parameters"), None,
                                        types.MappingProxyType({"output_parameters": api.get("output_parameters"),
                                                                "origin": "test"})))
            cands.append(name)
        m = re.match(r"API-Request: \[(\w+)\(", records.require_text(ex, "expected_output", loc, None))
        if m is None:
            raise DataError(f"{loc} field 'expected_output': not 'API-Request: [Name(...)]'")
        file, query = records.require_text(ex, "file", loc, None), records.require_text(ex, "input", loc, None)
        rows.append((f"level-1-api-{file}-{_dig(ex, loc, 'id')}", query, [m.group(1)], cands,
                     {"file": file, "expected_output": ex["expected_output"]}, loc))
    cat = Catalogue(tools.values(), source=str(path))
    return cat, {"level-1": [_record(*r[:5], cat, r[5], None) for r in rows]}


RAW_PARSERS: Mapping[str, Callable[[pathlib.Path], Parsed]] = {
    "metatool": parse_metatool,
    "toollens": parse_toollens,
    "bfcl": parse_bfcl,
    "seal_tools": parse_seal_tools,
    "api_bank": parse_api_bank_level1,
}


def parse_raw(data_dir, dataset: str) -> Parsed:
    """Parses ``<data_dir>/raw/<dataset>`` with the registered parser."""
    if dataset not in RAW_PARSERS:
        raise KeyError(f"no raw parser for {dataset!r}; have {sorted(RAW_PARSERS)}")
    return RAW_PARSERS[dataset](pathlib.Path(data_dir))
