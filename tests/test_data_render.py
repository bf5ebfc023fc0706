"""Tool rendering styles and the decoder prompt."""
import pytest

from mta_jax.data import records, render

A = records.Tool("a", "alpha", "does a", {"type": "dict", "properties": {"x": {"type": "int"}}}, "c")
B = records.Tool("b", "/v1/x", "does b", None, "Food", {"tool_name": "Nutri", "doc_text": "category_name:Food ..."})
B2 = records.Tool("b2", "/v1/x", "other", None, "Food", {"tool_name": "Other"})


def test_tool_text_styles():
    assert render.tool_text(A) == "alpha: does a"
    assert render.tool_text(A, "name_desc_params").startswith("alpha: does a Parameters: {")
    assert '"x"' in render.tool_text(A, "name_desc_params")
    assert render.tool_text(B, "name_desc_params") == "/v1/x: does b"
    assert render.tool_text(B, "doc_text") == "category_name:Food ..."
    assert render.tool_text(B, "tool_name_desc") == "Nutri / /v1/x: does b"
    with pytest.raises(KeyError, match="'a' has no 'doc_text'"):
        render.tool_text(A, "doc_text")
    assert render.tool_text(B, "full_doc") == "category_name:Food ..."          # the shipped doc
    assert render.tool_text(B2, "full_doc") == "Other / /v1/x: other"            # no doc: owner + name
    assert render.tool_text(A, "full_doc") == "alpha: does a"                    # neither: reference
    with pytest.raises(KeyError, match="unknown tool_text style"):
        render.tool_text(A, "fancy")


def test_compact_doc_drops_json_syntax_and_keeps_every_field():
    doc = ('category_name:Food, tool_name:Nutri, api_name:/v1/x, api_description:Nutrition facts., '
           'required_params: [{"name": "query", "type": "STRING", "description": "food, e.g. 3 eggs"}], '
           'optional_params: [{"name": "unit", "type": "STRING", "description": ""}], '
           'return_schema: {"calories": "float", "fat_g": "float"}')
    tool = records.Tool("t", "/v1/x", "Nutrition facts.", None, "Food", {"tool_name": "Nutri", "doc_text": doc})
    assert render.tool_text(tool, "compact_doc") == (
        "Nutri / /v1/x: Nutrition facts. Category: Food. Parameters: query (food, e.g. 3 eggs); unit. "
        "Returns: calories, fat_g.")
    no_schema = records.Tool("u", "n", "d", None, "c", {"doc_text": doc.replace(
        'return_schema: {"calories": "float", "fat_g": "float"}', 'return_schema: "a list"')})
    assert render.tool_text(no_schema, "compact_doc").endswith("Parameters: query (food, e.g. 3 eggs); unit.")
    assert render.tool_text(B2, "compact_doc") == "Other / /v1/x: other"  # no doc_text: full_name_desc
    bad = records.Tool("v", "n", "d", None, "c", {"doc_text": "free text"})
    with pytest.raises(ValueError, match="tool 'v': doc_text is not in ToolLens'"):
        render.tool_text(bad, "compact_doc")
    bad_json = records.Tool("w", "n", "d", None, "c", {"doc_text": doc.replace('"query"', "query")})
    with pytest.raises(ValueError, match="tool 'w': doc_text parameters"):
        render.tool_text(bad_json, "compact_doc")


def test_every_shipped_toollens_doc_has_the_compact_form(data_dir):
    tools = records.load_catalogue(data_dir / "normalized" / "toollens" / "tools.jsonl").tools
    for t in tools:
        text = render.tool_text(t, "compact_doc")
        assert text.startswith(f"{t.extras['tool_name']} / {t.name}: ") and f"Category: {t.domain}." in text
    assert len(tools) == 464


def test_decoder_prompt():
    prompt, target = render.decoder_prompt("find b", [A, B], gold=B)
    assert target == " /v1/x" and prompt.endswith("Request: find b\nTool:")
    assert prompt.index("- alpha: does a") < prompt.index("- /v1/x: does b")
    assert render.decoder_prompt("q", [A, B])[1] == ""
    with pytest.raises(ValueError, match="share label"):
        render.decoder_prompt("q", [B, B2], gold=B)
    assert render.decoder_prompt("q", [B, B2], gold=B2, label_style="tool_name/name")[1] == " Other//v1/x"
    with pytest.raises(ValueError, match="not among the candidates"):
        render.decoder_prompt("q", [A], gold=B)
