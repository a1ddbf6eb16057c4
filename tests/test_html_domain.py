"""HTML domain: tree-sitter parse facts, and examples grounded in real tool output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codeadapt import chat, tools
from codeadapt.html_domain import HTML_GENERATOR_VERSION, PHRASES, html_examples, parse_document

DATA = Path(__file__).resolve().parents[1] / "data" / "html"
LINE_RE = re.compile(r"\bline (\d+)")
SHOWN_RE = re.compile(r"^(?:[^:\n]+:)?(\d+):", re.MULTILINE)  # read_file "N: " or grep "path:N:"


@pytest.fixture(scope="module")
def corpus():
    return html_examples(DATA, "html-docs", "c0ffee", seed="t")


def answers_for(tmp_path: Path, html: str, kind: str) -> list[str]:
    (tmp_path / "page.html").write_text(html)
    examples, _ = html_examples(tmp_path, "src", "c0ffee")
    return [e.messages[-1]["content"] for e in examples if e.kind == kind]


def test_parse_lowercases_tags_and_keeps_attributes_text_and_lines():
    doc = parse_document(b'<!DOCTYPE html>\n<HTML LANG="en">\n<body>\n'
                         b'<P class=x>Terms &amp; <b>conditions</b></P>\n<input disabled>\n</body>')
    p = doc.find("p")[0]
    assert (p.tag, p.attr("class"), p.text, p.line) == ("p", "x", "Terms & conditions", 4)
    assert doc.find("html")[0].attr("lang") == "en"
    inp = doc.find("input")[0]
    assert inp.attr("disabled") == "" and inp.attr("missing") is None
    assert inp.line == inp.end_line == 5  # a void element ends on its own line
    assert [a.tag for a in doc.ancestors(p)] == ["body", "html"]
    assert not doc.has_error and doc.line_count == 6


def test_parse_keeps_unclosed_options_apart_and_drops_aria_hidden_text():
    doc = parse_document(b'<select><option value=1>One<option>Two</select>\n'
                         b'<button><span aria-hidden="true">&times;</span></button>')
    assert [o.text for o in doc.find("option")] == ["One", "Two"]
    assert doc.find("button")[0].text == ""


def test_img_alt_missing_is_none_and_decorative_is_empty():
    doc = parse_document(b'<img src="a.png">\n<img src="b.png" alt="">\n<img src=c alt="Cat">')
    assert [i.attr("alt") for i in doc.find("img")] == [None, "", "Cat"]


def test_table_header_scope():
    doc = parse_document(b"<table><tr><th scope=col>A</th><th>B</th></tr></table>")
    assert [(t.text, t.attr("scope")) for t in doc.find("th")] == [("A", "col"), ("B", None)]


def test_unlabeled_inputs_accepts_for_wrapping_aria_and_flags_the_rest(tmp_path: Path):
    html = """<html lang="en"><body><form>
<label for="a">A</label>
<input id="a" name="by_for">
<label>B <input name="wrapped"></label>
<input name="aria" aria-label="C">
<span id="d">D</span>
<input name="labelledby" aria-labelledby="d">
<input name="broken" aria-labelledby="nope">
<input name="placeholder_only" placeholder="Email">
<input type="hidden" name="token">
<button type="submit">Go</button>
</form></body></html>
"""
    (answer,) = answers_for(tmp_path, html, "html_unlabeled_inputs")
    assert answer.startswith("Two of the six form fields lack a label:")
    for name in ("`broken` (text, line 8)", '`placeholder_only` (text, line 9, placeholder'):
        assert name in answer
    for name in ("by_for", "wrapped", "`aria`", "`labelledby`", "token"):
        assert name not in answer.split("lack a label:")[1].split(".")[0]


def test_all_labelled_form_says_none(tmp_path: Path):
    html = '<html lang="en"><body>\n<label for="q">Q</label>\n<input id="q" name="q">\n</body>'
    assert answers_for(tmp_path, html, "html_unlabeled_inputs") == [
        "No problems: the only form field has a label (1 via `<label for>`)."]


def test_heading_skips_are_reported_and_a_clean_outline_is_not(tmp_path: Path):
    skipped = "<h1>Top</h1>\n<h2>Sub</h2>\n<h4>Deep</h4>\n"
    (answer,) = answers_for(tmp_path, skipped, "html_heading_outline")
    assert 'h4 "Deep" (line 3) follows h2 "Sub" (line 2), skipping h3' in answer
    (answer,) = answers_for(tmp_path, "<h1>Top</h1>\n<h2>Sub</h2>\n", "html_heading_outline")
    assert answer.endswith("No levels are skipped.")


def test_grep_is_used_only_when_its_lines_show_the_whole_element(tmp_path: Path):
    (tmp_path / "one.html").write_text('<img src="a.png">\n<img src="b.png" alt="B">\n')
    (tmp_path / "split.html").write_text('<img src="a.png"\n  alt="A">\n<img src="b.png">\n')
    examples, _ = html_examples(tmp_path, "src", "c0ffee")
    calls = {e.path: e.messages[2]["tool_calls"][0]["function"]["name"]
             for e in examples if e.kind == "html_missing_alt"}
    assert calls == {"one.html": "grep", "split.html": "read_file"}


def test_drops_are_counted_not_raised(tmp_path: Path):
    (tmp_path / "long.html").write_text("<p>x</p>\n" * (tools.MAX_READ_LINES + 1))
    (tmp_path / "latin1.html").write_bytes("<p>caf\xe9</p>".encode("latin-1"))
    (tmp_path / "empty.html").write_text("  \n")
    examples, stats = html_examples(tmp_path, "src", "c0ffee")
    assert examples == [] and stats["documents"] == 0
    drops = (stats["dropped_too_long"], stats["dropped_not_utf8"], stats["dropped_empty"])
    assert drops == (1, 1, 1)
    with pytest.raises(FileNotFoundError):
        html_examples(tmp_path / "nope", "src", "c0ffee")


def test_corpus_counts_and_kinds(corpus):
    examples, stats = corpus
    assert stats["documents"] >= 12 and stats["examples"] == len(examples) >= 30
    assert not [k for k in stats if k.startswith("dropped_")]
    assert set(PHRASES) == {e.kind for e in examples}
    assert all(len(p) >= 10 for p in PHRASES.values())
    answers = {e.messages[-1]["content"] for e in examples if e.kind == "html_unlabeled_inputs"}
    assert any(a.startswith("No problems:") for a in answers) and any("lack a label" in a for a in answers)


def test_every_example_validates_and_carries_provenance(corpus):
    for e in corpus[0]:
        chat.validate_messages(list(e.messages), list(e.tools))
        assert e.tools == chat.tool_schemas()
        assert (e.source, e.commit, e.generator_version) == ("html-docs", "c0ffee",
                                                             HTML_GENERATOR_VERSION)
        n_lines = len((DATA / e.path).read_text().splitlines())
        assert 1 <= e.start_line <= e.end_line <= n_lines, (e.path, e.kind)


def test_every_tool_result_replays_and_shows_every_cited_line(corpus):
    for e in corpus[0]:
        answer = e.messages[-1]["content"]
        pairs = chat.tool_calls_of(list(e.messages))
        if not pairs:  # direct answers quote the form in the question and cite no lines
            assert e.kind.startswith("html_direct_") and not LINE_RE.search(answer)
            continue
        for call, result in pairs:
            fn = call["function"]
            assert result["content"] == tools.execute(DATA, fn["name"], fn["arguments"])
            assert not result["content"].startswith("error:")
        shown = {int(n) for n in SHOWN_RE.findall(result["content"])}
        cited = {int(n) for n in LINE_RE.findall(answer)}
        assert cited <= shown, (e.path, e.kind, cited - shown)


def test_output_is_deterministic_and_seeded(corpus):
    again = html_examples(DATA, "html-docs", "c0ffee", seed="t")
    assert again == corpus
    other, _ = html_examples(DATA, "html-docs", "c0ffee", seed="u")
    assert [e.messages[1] for e in other] != [e.messages[1] for e in corpus[0]]


def test_test_split_pages_get_wordings_no_train_page_gets(monkeypatch) -> None:
    from codeadapt import wordings
    from codeadapt.dataset import split_of

    monkeypatch.setattr(wordings, "TYPO_RATE", 0.0)
    split = (0.0, 0.5, "salt")
    examples, _ = html_examples(DATA, "html-docs", "c0ffee", seed="t", split=split)
    seen = set()
    for e in examples:
        test = split_of("html-docs", e.path, *split) == "test"
        q = e.messages[1]["content"]
        allowed = PHRASES[e.kind][-wordings.TEST_ONLY:] if test else PHRASES[e.kind][:-wordings.TEST_ONLY]
        pat = lambda w, path=e.path: re.escape(w).replace(r"\{path\}", re.escape(path)).replace(r"\{ref\}", "(?s:.+)")  # noqa: E731
        assert any(re.fullmatch(pat(w), q) for w in allowed), (test, q)
        seen.add(test)
    assert seen == {True, False}


def test_one_table_or_form_is_located_by_grep_then_read_by_its_lines(tmp_path: Path):
    page = """<html lang="en"><body>
<table id="a"><tr><th scope="col">A</th></tr>
<tr><td>1</td></tr></table>
<form action="/s">
<label for="q">Query</label>
<input id="q" name="q">
<input name="bare">
</form>
<table id="b">
<tr><td>2</td></tr>
</table>
</body></html>
"""
    (tmp_path / "page.html").write_text(page)
    examples, _ = html_examples(tmp_path, "src", "c0ffee")
    steps = {}
    for e in examples:
        calls = [(c["function"]["name"], c["function"]["arguments"])
                 for c, _ in chat.tool_calls_of(list(e.messages))]
        steps.setdefault(e.kind, []).append(calls)
    assert steps["html_table_headers"] == [
        [("grep", {"pattern": r"(?i)<table\b", "path": "page.html"}),
         ("read_file", {"path": "page.html", "start_line": lo, "end_line": hi})]
        for lo, hi in ((2, 3), (9, 11))]
    assert steps["html_unlabeled_inputs"] == [[
        ("grep", {"pattern": r"(?i)<form\b", "path": "page.html"}),
        ("read_file", {"path": "page.html", "start_line": 4, "end_line": 8})]]
    # a label outside the form: reading the form would not show it, so the whole page is read
    (tmp_path / "page.html").write_text(page.replace("<label for=\"q\">Query</label>\n", "")
                                        .replace("<body>", '<body><label for="q">Query</label>'))
    examples, _ = html_examples(tmp_path, "src", "c0ffee")
    (e,) = [e for e in examples if e.kind == "html_unlabeled_inputs"]
    assert [c["function"]["arguments"] for c, _ in chat.tool_calls_of(list(e.messages))] == [
        {"path": "page.html"}]
