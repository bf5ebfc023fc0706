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
    with pytest.raises(KeyError, match="unknown tool_text style"):
        render.tool_text(A, "fancy")


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
