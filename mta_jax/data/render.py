"""Turns tools into text: documents for the bi-encoder, labels and prompts for the decoder."""
from __future__ import annotations

import json
import re
from typing import Callable, Mapping, Sequence

from mta_jax.data.records import Tool


def _name_desc(tool: Tool) -> str:
    # The data README's reference rendering: the reference zero-shot numbers were computed with it.
    return f"{tool.name}: {tool.description}"


def _params_text(parameters) -> str:
    if parameters is None:
        return ""
    # Compact, key-order-preserving JSON: deterministic and close to how schemas appear in prompts.
    return json.dumps(parameters, ensure_ascii=False, separators=(", ", ": "))


def _name_desc_params(tool: Tool) -> str:
    params = _params_text(tool.parameters)
    return _name_desc(tool) + (f" Parameters: {params}" if params else "")


def _extra_text(tool: Tool, field: str) -> str | None:
    """The dataset-specific text field ``field`` of ``tool``, or ``None`` if absent or blank."""
    v = tool.extras.get(field) if tool.extras else None
    return v if isinstance(v, str) and v.strip() else None


def _extra(field: str, style: str) -> Callable[[Tool], str]:
    def render(tool: Tool) -> str:
        v = _extra_text(tool, field)
        if v is None:
            raise KeyError(f"tool {tool.tool_id!r} has no {field!r} text, needed by tool_text style {style!r} "
                           "(only ToolLens tools carry it)")
        return v
    return render


def _toollens_full_name(tool: Tool) -> str:
    # ToolLens' bare endpoint names collide (e.g. 'Autocomplete'); prefixing the RapidAPI tool disambiguates.
    return f"{_extra('tool_name', 'tool_name_desc')(tool)} / {tool.name}: {tool.description}"


def _full_name_desc(tool: Tool) -> str:
    """``"{tool_name} / {name}: {description}"`` where the dataset names the owning tool (ToolLens'
    RapidAPI tool), else the reference ``"{name}: {description}"`` — usable on every dataset."""
    owner = tool.extras.get("tool_name") if tool.extras else None
    return f"{owner} / {_name_desc(tool)}" if owner else _name_desc(tool)


def _full_doc(tool: Tool) -> str:
    """The dataset's full flattened doc where it ships one (ToolLens' ``doc_text``: category, tool,
    endpoint, description, parameters, return schema), else :func:`_full_name_desc`."""
    return _extra_text(tool, "doc_text") or _full_name_desc(tool)


# ToolLens' flattened doc (the COLT corpus text): fixed fields in a fixed order, JSON lists/objects inside.
_TOOLLENS_DOC = re.compile(r"category_name:(?P<category>.*?), tool_name:(?P<tool>.*?), api_name:(?P<api>.*?), "
                           r"api_description:(?P<desc>.*?), required_params: (?P<req>\[.*?\]), "
                           r"optional_params: (?P<opt>\[.*?\]), return_schema: (?P<ret>.*)", re.S)


def _compact_doc(tool: Tool) -> str:
    """ToolLens' ``doc_text`` without its JSON syntax, in about a third of the tokens:
    ``"{tool} / {api}: {description} Category: {c}. Parameters: p (its description); ... Returns: k1,
    k2."`` (the top-level keys of the return schema). Tools without a ``doc_text``: :func:`_full_name_desc`.

    Raises:
      ValueError: a ``doc_text`` that is not in ToolLens' form (names the tool).
    """
    doc = _extra_text(tool, "doc_text")
    if doc is None:
        return _full_name_desc(tool)
    form = ("ToolLens' 'category_name:..., tool_name:..., api_name:..., api_description:..., "
            "required_params: [...], optional_params: [...], return_schema: ...' form")
    m = _TOOLLENS_DOC.fullmatch(doc.strip())
    if m is None:
        raise ValueError(f"tool {tool.tool_id!r}: doc_text is not in {form}")
    try:
        params = json.loads(m["req"]) + json.loads(m["opt"])
        names = [p["name"] + (f" ({p['description']})" if p.get("description") else "") for p in params]
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"tool {tool.tool_id!r}: doc_text parameters are not in {form} "
                         f"({type(e).__name__}: {e})") from None
    try:
        returns = json.loads(m["ret"])
    except ValueError:
        returns = None  # free-text or truncated schemas carry no usable key list
    keys = list(returns) if isinstance(returns, dict) else []
    text = f"{m['tool']} / {m['api']}: {m['desc']} Category: {m['category']}."
    text += f" Parameters: {'; '.join(names)}." if names else ""
    return text + (f" Returns: {', '.join(keys)}." if keys else "")


TOOL_TEXT_STYLES: Mapping[str, Callable[[Tool], str]] = {
    "full_name_desc": _full_name_desc,
    "full_doc": _full_doc,
    "compact_doc": _compact_doc,
    "name_desc": _name_desc,
    "name_desc_params": _name_desc_params,
    "doc_text": _extra("doc_text", "doc_text"),
    "tool_name_desc": _toollens_full_name,
}


def tool_text(tool: Tool, style: str = "name_desc") -> str:
    """Renders a tool as a document for embedding.

    Args:
      tool: the tool.
      style: a key of :data:`TOOL_TEXT_STYLES`: ``"name_desc"`` = ``f"{name}: {description}"`` (the
        reference), ``"name_desc_params"`` (+ JSON parameter schema), ``"doc_text"`` (ToolLens' flattened
        doc with parameters), ``"full_doc"`` (``doc_text`` where the tool has it, else
        ``"full_name_desc"``: usable on every dataset), ``"compact_doc"`` (``doc_text`` without its JSON
        syntax, else ``"full_name_desc"``), ``"tool_name_desc"`` (ToolLens: RapidAPI tool name / endpoint name).

    Raises:
      KeyError: unknown style, or the tool lacks the field the style needs.
    """
    if style not in TOOL_TEXT_STYLES:
        raise KeyError(f"unknown tool_text style {style!r}; have {sorted(TOOL_TEXT_STYLES)}")
    return TOOL_TEXT_STYLES[style](tool)


def pseudo_query(tool: Tool) -> str:
    """A query-like text from a tool's documentation alone: its description (its name if it has none).

    Used to adapt to unseen tools from their docs, without any labelled query
    (``EpisodeConfig.support_source="docs"``, ``mta_docs``).
    """
    return tool.description.strip() or tool.name


LABEL_STYLES: Mapping[str, Callable[[Tool], str]] = {
    "name": lambda t: t.name,
    "tool_name/name": lambda t: f"{_extra('tool_name', 'tool_name/name')(t)}/{t.name}",
}

PROMPT_HEADER = ("Choose the one tool that best serves the user's request. "
                 "Answer with the tool's name only.\n\nTools:\n")


def decoder_prompt(query: str, candidates: Sequence[Tool], gold: Tool | None = None,
                   *, label_style: str = "name") -> tuple[str, str]:
    """Builds the decoder's selection prompt (the paper's setup: candidates listed, target = tool name).

    Args:
      query: the user query.
      candidates: the candidate tools, in display order.
      gold: the correct tool (must be among ``candidates``); ``None`` for inference (target ``""``).
      label_style: how a tool is named (a key of :data:`LABEL_STYLES`); the target uses the same label.

    Returns:
      ``(prompt, target)``: the prompt ends with ``"Tool:"``; the target is ``" " + label`` so that it
      tokenizes as a continuation (constrained scoring compares the candidates' targets).

    Raises:
      ValueError: two candidates share a label (exact-match answers would be ambiguous: use another
        ``label_style``), or ``gold`` is not a candidate.
    """
    if label_style not in LABEL_STYLES:
        raise KeyError(f"unknown label_style {label_style!r}; have {sorted(LABEL_STYLES)}")
    label = LABEL_STYLES[label_style]
    labels = [label(t) for t in candidates]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"candidates share label(s) {dup} under label_style {label_style!r}; "
                         f"the model's answer would be ambiguous")
    lines = [f"- {lab}: {t.description}" if t.description else f"- {lab}" for lab, t in zip(labels, candidates)]
    prompt = PROMPT_HEADER + "\n".join(lines) + f"\n\nRequest: {query}\nTool:"
    if gold is None:
        return prompt, ""
    if gold.tool_id not in {t.tool_id for t in candidates}:
        raise ValueError(f"gold tool {gold.tool_id!r} is not among the candidates")
    return prompt, " " + label(gold)
