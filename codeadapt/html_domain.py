"""Grounded HTML examples: forms, tables, headings, landmarks and accessibility checks.

tree-sitter-html parses each document into `Element`s; each kind asks a question, calls grep
(when the matching lines alone show everything the answer needs) or read_file on the document,
and answers from the parse, citing only lines the tool result shows.
"""

from __future__ import annotations

import html as html_lib
import itertools
import random
import re
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tree_sitter_html
from tree_sitter import Language, Node, Parser

from codeadapt import chat, tools, wordings
from codeadapt.dataset import split_of
from codeadapt.records import Example

HTML_GENERATOR_VERSION = "3"
MAX_DIRECT_LINES = 40  # longest form pasted into a direct question

_LANGUAGE = Language(tree_sitter_html.language())
_START_NODES = frozenset({"start_tag", "self_closing_tag"})
_TAG_NODES = _START_NODES | {"end_tag"}
_NOT_LABELABLE = frozenset({"hidden", "submit", "reset", "button", "image"})
_LANDMARK_TAGS = {"header": "banner", "nav": "navigation", "main": "main",
                  "aside": "complementary", "footer": "contentinfo"}
_LANDMARK_ROLES = frozenset({*_LANDMARK_TAGS.values(), "search"})
_SECTIONING = frozenset({"article", "aside", "main", "nav", "section"})
_VAGUE = frozenset({"click here", "here", "more", "read more", "learn more", "link", "this",
                    "click", "details", "more info", "hier", "hier klicken", "mehr"})
_FILENAME_ALT = re.compile(r"\.(jpe?g|png|gif|svg|webp)$", re.IGNORECASE)
_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_LACK = ("lacks", "lack")


@dataclass(frozen=True, slots=True)
class Element:
    """One element: lowercased tag, attributes, visible text and 1-based lines."""

    index: int
    tag: str
    attributes: tuple[tuple[str, str | None], ...]  # names lowercased; None for a bare attribute
    text: str  # descendant text, whitespace-collapsed; no script, style or aria-hidden content
    line: int
    end_line: int
    tag_end_line: int  # line where the start tag closes
    parent: int  # index of the parent element, -1 at the top
    last: int  # index of the last descendant (== index for a leaf)

    def attr(self, name: str) -> str | None:
        """The value of attribute `name` ("" for a bare one), or None when absent."""
        for key, value in self.attributes:
            if key == name:
                return "" if value is None else value
        return None


@dataclass(frozen=True, slots=True)
class Document:
    """All elements of one HTML file, in document order."""

    elements: tuple[Element, ...]
    line_count: int
    has_error: bool

    def find(self, *tags: str) -> list[Element]:
        """Elements with any of `tags` (lowercase), in document order."""
        return [e for e in self.elements if e.tag in tags]

    def descendants(self, el: Element) -> list[Element]:
        """Everything nested inside `el`, in document order."""
        return list(self.elements[el.index + 1 : el.last + 1])

    def ancestors(self, el: Element) -> list[Element]:
        """Enclosing elements, innermost first."""
        out, i = [], el.parent
        while i >= 0:
            out.append(self.elements[i])
            i = self.elements[i].parent
        return out

    def by_id(self, ident: str) -> Element | None:
        """The first element with `id="ident"`."""
        return next((e for e in self.elements if e.attr("id") == ident), None)


def _attribute(node: Node) -> tuple[str, str | None]:
    """(lowercased name, unescaped value or None) of one attribute node."""
    name, value = "", None
    for c in node.children:
        if c.type == "attribute_name":
            name = c.text.decode("utf-8", "replace").lower()
        elif c.type == "attribute_value":
            value = c.text.decode("utf-8", "replace")
        elif c.type == "quoted_attribute_value":
            inner = [g for g in c.children if g.type == "attribute_value"]
            value = inner[0].text.decode("utf-8", "replace") if inner else ""
    return name, None if value is None else html_lib.unescape(value)


def _join_text(pieces: list[tuple[int, int, str]]) -> str:
    """Concatenate text pieces, with a space where the source had a gap between them."""
    out, prev = "", None
    for start, end, text in pieces:
        out += (" " if prev is not None and start > prev else "") + text
        prev = end
    return " ".join(out.split())


def parse_document(data: bytes) -> Document:
    """Parse HTML with tree-sitter-html into a flat list of elements."""
    tree = Parser(_LANGUAGE).parse(data)
    rows: list[dict[str, Any]] = []

    def visit(node: Node, parent: int) -> list[tuple[int, int, str]]:
        if node.type in ("text", "entity"):  # entities are separate nodes
            text = html_lib.unescape(node.text.decode("utf-8", "replace"))
            return [(node.start_byte, node.end_byte, text)]
        start = next((c for c in node.children if c.type in _START_NODES), None)
        if not node.type.endswith("element") or start is None:  # document, ERROR: transparent
            return [p for c in node.children for p in visit(c, parent)]
        name = next((c for c in start.children if c.type == "tag_name"), None)
        tag = name.text.decode("utf-8", "replace").lower() if name else ""  # source case varies
        attrs = tuple(_attribute(a) for a in start.children if a.type == "attribute")
        end = node.children[-1]  # a void element's node can run on over the following whitespace
        idx = len(rows)
        rows.append({"index": idx, "tag": tag, "attributes": attrs, "parent": parent,
                     "line": node.start_point.row + 1, "end_line": end.end_point.row + 1,
                     "tag_end_line": start.end_point.row + 1})
        pieces = [p for c in node.children if c.type not in _TAG_NODES for p in visit(c, idx)]
        rows[idx].update(text=_join_text(pieces), last=len(rows) - 1)
        hidden = dict(attrs).get("aria-hidden") == "true" or tag in ("script", "style")
        # tree-sitter-html does not close <option> implicitly: keep a nested option's text out
        if hidden or (tag == "option" and parent >= 0 and rows[parent]["tag"] == "option"):
            return []
        return [(node.start_byte, end.end_byte, rows[idx]["text"])]

    visit(tree.root_node, -1)
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    return Document(tuple(Element(**r) for r in rows), lines, tree.root_node.has_error)


# ---- wording and accessibility rules -----------------------------------------------------------


def _join(items: list[str], last: str = "and") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {last} " + items[-1]


def _n(count: int, noun: str) -> str:
    """'one image', 'three images', '12 images'."""
    word = _WORDS[count] if count < len(_WORDS) else str(count)
    return f"{word} {noun if count == 1 else noun + 's'}"


def _of(k: int, n: int, noun: str, verb: tuple[str, str] = ("has", "have")) -> str:
    """'the only image has', 'both images have', 'one of the four images has'."""
    if n == 1:
        return f"the only {noun} {verb[0]}"
    if k == n:
        return f"both {noun}s {verb[1]}" if n == 2 else f"all {_n(n, noun)} {verb[1]}"
    return f"{_n(k, noun).split()[0]} of the {_n(n, noun)} {verb[0] if k == 1 else verb[1]}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lines(els: list[Element]) -> str:
    return _join([f"line {e.line}" for e in els])


def _control_type(el: Element) -> str:
    return (el.attr("type") or "text").lower() if el.tag == "input" else el.tag


def _control_ref(el: Element) -> str:
    """How an answer names a form control: its name, else its id, else its type."""
    ident = el.attr("name") or el.attr("id")
    return f"`{ident}`" if ident else f"an unnamed {_control_type(el)} field"


def _short(el: Element) -> str:
    """`<tag>` plus its text or class, to point at an element."""
    if el.text and len(el.text) <= 40:
        return f'`<{el.tag}>` "{el.text}"'
    return f'`<{el.tag} class="{el.attr("class")}">`' if el.attr("class") else f"`<{el.tag}>`"


def _accessible_name(doc: Document, el: Element) -> str:
    """Name of a link or button: aria-labelledby, aria-label, text and image alt, then title."""
    refs = [doc.by_id(i) for i in (el.attr("aria-labelledby") or "").split()]
    named = " ".join(r.text for r in refs if r is not None).strip()
    if named or (el.attr("aria-label") or "").strip():
        return named or (el.attr("aria-label") or "").strip()
    alts = [d.attr("alt") or "" for d in doc.descendants(el) if d.tag == "img"]
    return " ".join([el.text, *alts]).strip() or (el.attr("title") or "").strip()


def _label_method(doc: Document, el: Element) -> str | None:
    """How a form control is labelled, or None; a placeholder or title does not count."""
    if (el.attr("aria-label") or "").strip():
        return "`aria-label`"
    if any(doc.by_id(r) is not None for r in (el.attr("aria-labelledby") or "").split()):
        return "`aria-labelledby`"
    if el.attr("id") and any(lab.attr("for") == el.attr("id") for lab in doc.find("label")):
        return "`<label for>`"
    return "a wrapping `<label>`" if any(a.tag == "label" for a in doc.ancestors(el)) else None


def _controls(doc: Document, labelable: bool = False) -> list[Element]:
    els = doc.find("input", "select", "textarea")
    return [e for e in els if _control_type(e) not in _NOT_LABELABLE] if labelable else els


# ---- grounding: which tool call shows what the answer says -------------------------------------


@dataclass(frozen=True, slots=True)
class _Draft:
    """One example before its tool runs."""

    kind: str
    question: str
    answer: str
    tool: str | None  # None: a direct answer with no tool call
    arguments: dict[str, Any]
    span: tuple[int, int] | None = None  # None: the lines the answer cites, else the whole file
    # A grep pattern that finds where `span` starts: a person looking for one table or form
    # greps for it, then reads just its lines (call 2), as with a Python definition.
    locate: str | None = None


def _grep_fits(root: Path, rel: str, pattern: str, els: list[Element], whole: bool) -> bool:
    """True when grepping `pattern` shows exactly the lines holding `els`, each in full."""
    out = tools.grep(root, pattern, rel)
    if out == "No matches.":
        return not els
    hits = [h.split(":", 2) for h in out.splitlines()]
    if any(len(h) < 3 or not h[1].isdigit() or len(h[2]) >= tools.MAX_LINE_CHARS for h in hits):
        return False  # truncated output or a clipped line
    ends = [e.end_line if whole else e.tag_end_line for e in els]
    return {int(h[1]) for h in hits} == {e.line for e in els} and ends == [e.line for e in els]


def _draft(kind: str, q: str, ans: str, root: Path, rel: str,
           grep: tuple[str, list[Element], bool] | None = None,
           span: tuple[int, int] | None = None, locate: str | None = None) -> _Draft:
    """Grep (pattern, elements, whole element per line) when its output suffices; else, with
    `locate` and a `span`, grep for where the span starts and read it; else read the file."""
    if grep is not None and _grep_fits(root, rel, *grep):
        return _Draft(kind, q, ans, "grep", {"pattern": grep[0], "path": rel}, span)
    if locate is not None and span is not None and _locates(root, rel, locate, span[0]):
        read = {"path": rel, "start_line": span[0], "end_line": span[1]}
        return _Draft(kind, q, ans, "read_file", read, span, locate)
    return _Draft(kind, q, ans, "read_file", {"path": rel}, span)


def _locates(root: Path, rel: str, pattern: str, line: int) -> bool:
    """True when grepping `pattern` in `rel` lists `line` among its hits."""
    out = tools.grep(root, pattern, rel)
    return any(h.split(":", 2)[1:2] == [str(line)] for h in out.splitlines())


# ---- example kinds: each turns one document into drafts ----------------------------------------

# Wordings of the HTML kinds live with the Python ones (codeadapt.wordings): ten or more per
# kind, the last three only for test examples.
PHRASES = {k: v for k, v in wordings.WORDINGS.items() if k.startswith("html_")}
Kind = Callable[[Document, Path, str, random.Random], list[_Draft]]


class _Rng(random.Random):
    """The per-file random source; `test` says the file's examples land in the test split."""

    test = False


def _ask(rng: random.Random, kind: str, path: str, ref: str = "") -> str:
    return wordings.pick(kind, rng, getattr(rng, "test", False), path=path, ref=ref)


def _unlabeled_inputs(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    controls = _controls(doc, labelable=True)
    if not controls:
        return []
    methods = {c.index: _label_method(doc, c) for c in controls}
    missing = [c for c in controls if methods[c.index] is None]
    if not missing:
        how = Counter(methods.values())
        ans = (f"No problems: {_of(len(controls), len(controls), 'form field')} a label ("
               + _join([f"{k} via {m}" for m, k in how.items()]) + ").")
    else:
        items = [f"{_control_ref(c)} ({_control_type(c)}, line {c.line}"
                 + (f', placeholder "{c.attr("placeholder")}" only)' if c.attr("placeholder")
                    else ", `title` only)" if c.attr("title") else ")") for c in missing]
        lack = _of(len(missing), len(controls), "form field", _LACK)
        ans = f"{_cap(lack)} a label: {_join(items)}."
        for lab in doc.find("label"):
            if lab.attr("for") and doc.by_id(lab.attr("for") or "") is None:
                ans += (f' The `<label for="{lab.attr("for")}">` on line {lab.line} labels '
                        f'nothing: no element has `id="{lab.attr("for")}"`.')
        for c in missing:
            for ref in (c.attr("aria-labelledby") or "").split():
                ans += (f' {_cap(_control_ref(c))} points `aria-labelledby` at "{ref}", '
                        "which no element has as its id.")
        if any(c.attr("placeholder") or c.attr("title") for c in missing):
            ans += " A placeholder or title does not replace a label."
    for f in doc.find("fieldset"):  # a group of controls needs its own caption too
        if not any(c.tag == "legend" and c.parent == f.index for c in doc.descendants(f)):
            ans += f" The `<fieldset>` on line {f.line} has no `<legend>` to name its group."
    q = _ask(rng, "html_unlabeled_inputs", rel)
    form = _enclosing_form(doc, controls)
    span = (form.line, form.end_line) if form is not None else None
    return [_draft("html_unlabeled_inputs", q, ans, root, rel, span=span, locate=r"(?i)<form\b")]


def _enclosing_form(doc: Document, controls: list[Element]) -> Element | None:
    """The one `<form>` that holds every control, label and fieldset and every element a
    control's `aria-labelledby` names, when there is one: reading it shows all the audit needs."""
    refs = [doc.by_id(r) for c in controls for r in (c.attr("aria-labelledby") or "").split()]
    labels, groups = doc.find("label"), doc.find("fieldset")
    for form in doc.find("form"):
        inside = {d.index for d in doc.descendants(form)}
        if (all(e.index in inside for e in [*controls, *labels, *groups])
                and all(r is not None and r.index in inside for r in refs)
                and all(doc.by_id(lab.attr("for") or "") is not None for lab in labels
                        if lab.attr("for"))):
            return form
    return None


def _field_groups(controls: list[Element]) -> list[list[Element]]:
    """Controls as a user sees them: radios and checkboxes sharing a name are one field."""
    groups: dict[str, list[Element]] = {}
    for c in controls:
        shared = _control_type(c) in ("radio", "checkbox") and c.attr("name")
        groups.setdefault(f"name:{c.attr('name')}" if shared else f"#{c.index}", []).append(c)
    return list(groups.values())


def _describe_fields(groups: list[list[Element]], cite: bool) -> tuple[list[str], list[str]]:
    """One bullet per field, and the names of the required ones."""
    bullets, required = [], []
    for els in groups:
        kind = _control_type(els[0])
        desc = f"{kind} group of {len(els)}" if len(els) > 1 else kind
        if any(e.attr("required") is not None for e in els):
            desc += ", required"
            required.append(_control_ref(els[0]))
        where = f" (line {els[0].line})" if cite else ""
        bullets.append(f"- {_control_ref(els[0])}: {desc}{where}")
    return bullets, required


def _form_fields(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    controls = _controls(doc)
    if not controls:
        return []
    bullets, required = _describe_fields(_field_groups(controls), cite=True)
    tail = f"Required: {_join(required)}." if required else "None of them is marked `required`."
    ans = f"{rel} has {_n(len(bullets), 'field')}:\n" + "\n".join(bullets) + "\n" + tail
    grep = (r"(?i)<(input|select|textarea)\b", controls, False)
    return [_draft("html_form_fields", _ask(rng, "html_form_fields", rel), ans, root, rel, grep)]


def _direct_required(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    lines, drafts = (root / rel).read_text(encoding="utf-8").splitlines(), []
    for form in doc.find("form"):
        wanted = {c.index for c in _controls(doc)}
        controls = [d for d in doc.descendants(form) if d.index in wanted]
        if not controls or form.end_line - form.line >= MAX_DIRECT_LINES:
            continue
        snippet = textwrap.dedent("\n".join(lines[form.line - 1 : form.end_line]))
        bullets, required = _describe_fields(_field_groups(controls), cite=False)
        ans = (f"These have the `required` attribute: {_join(required)}." if required
               else "Nothing: no field in this form has the `required` attribute.")
        ans += " The other fields are optional." if 0 < len(required) < len(bullets) else ""
        q = _ask(rng, "html_direct_required", rel, f"```html\n{snippet}\n```")
        drafts.append(_Draft("html_direct_required", q, ans, None, {}, (form.line, form.end_line)))
    return drafts


def _missing_alt(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    imgs = doc.find("img")
    if not imgs and rng.random() < 0.6:  # keep some "no images" answers, not one per page
        return []
    missing = [i for i in imgs if i.attr("alt") is None]
    parts = [] if imgs else [f"{rel} has no `<img>` elements, so no image is missing alt text."]
    if missing:
        items = _join([f"`{i.attr('src')}` (line {i.line})" for i in missing])
        lack = _of(len(missing), len(imgs), "image", _LACK)
        parts.append(f"{_cap(lack)} an `alt` attribute: {items}.")
        for i in missing:
            if any(a.tag == "a" and not _accessible_name(doc, a) for a in doc.ancestors(i)):
                parts.append(f"The image on line {i.line} is all there is in its link, so the link "
                             "has no accessible name either.")
    elif imgs:
        parts.append(f"No problems: {_of(len(imgs), len(imgs), 'image')} an `alt` attribute.")
    empty = [i for i in imgs if i.attr("alt") == ""]
    if empty:
        what = "a decorative image" if len(empty) == 1 else "decorative images"
        parts.append(f'`alt=""` on {_lines(empty)} marks {what}, which is fine.')
    for i in imgs:
        if _FILENAME_ALT.search(i.attr("alt") or ""):
            parts.append(f'The alt text on line {i.line}, "{i.attr("alt")}", is a file name and '
                         "describes nothing.")
    q = _ask(rng, "html_missing_alt", rel)
    return [_draft("html_missing_alt", q, " ".join(parts), root, rel, (r"(?i)<img\b", imgs, True))]


def _table_headers(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    tables, drafts = doc.find("table"), []
    for k, table in enumerate(tables):
        own = [d for d in doc.descendants(table)
               if next(a for a in doc.ancestors(d) if a.tag == "table") is table]
        caption = next((d for d in own if d.tag == "caption"), None)
        ref = (f"the `{table.attr('id')}` table" if table.attr("id")
               else f'the "{caption.text}" table' if caption and caption.text
               else "the table" if len(tables) == 1 else f"table {k + 1}")
        parts = [f"{_cap(ref)} starts on line {table.line}."]
        if table.attr("role") in ("presentation", "none"):
            parts.append(f'It has `role="{table.attr("role")}"`: a layout table, so it needs no '
                         "caption or header cells.")
        else:
            parts.append(f'Its caption is "{caption.text}" (line {caption.line}).' if caption
                         else "It has no `<caption>`.")
            ths = [d for d in own if d.tag == "th"]
            unscoped = [t for t in ths if t.attr("scope") is None]
            if not ths:
                parts.append("It has no `<th>` cells at all, so no data cell is tied to a header.")
            elif unscoped:
                cells = _join([f'"{t.text}" (line {t.line})' for t in unscoped])
                parts.append(f"{_cap(_of(len(unscoped), len(ths), '`<th>` cell', _LACK))} a "
                             f"`scope`: {cells}.")
            else:
                scopes = _join([f"`{s}`" for s in sorted({t.attr('scope') or '' for t in ths})])
                parts.append(f"{_cap(_of(len(ths), len(ths), '`<th>` cell'))} a `scope` "
                             f"({scopes}).")
            rows = [r for r in own if r.tag == "tr" and not any(a.tag == "thead" for a in
                    doc.ancestors(r)) and any(c.tag == "td" for c in doc.descendants(r))]
            plain = [r for r in rows if not any(c.tag == "th" for c in doc.descendants(r))]
            if plain:
                parts.append(f"{_cap(_of(len(plain), len(rows), 'data row', _LACK))} a row header "
                             f"({_lines(plain)}).")
            elif rows:
                parts.append("Every data row starts with a row header.")
        q, span = _ask(rng, "html_table_headers", rel, ref), (table.line, table.end_line)
        drafts.append(_draft("html_table_headers", q, " ".join(parts), root, rel, span=span,
                             locate=r"(?i)<table\b"))
    return drafts


def _heading_outline(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    heads = doc.find("h1", "h2", "h3", "h4", "h5", "h6")
    if not heads:
        return []
    level = {h.index: int(h.tag[1]) for h in heads}
    outline = [f'{"  " * (level[h.index] - 1)}- {h.tag} "{h.text}" (line {h.line})' for h in heads]
    skips = [f'{b.tag} "{b.text}" (line {b.line}) follows {a.tag} "{a.text}" (line {a.line}), '
             "skipping " + _join([f"h{n}" for n in range(level[a.index] + 1, level[b.index])])
             for a, b in itertools.pairwise(heads) if level[b.index] > level[a.index] + 1]
    if heads[0].tag != "h1":
        skips.insert(0, f"the first heading is an {heads[0].tag} (line {heads[0].line}), not an h1")
    ans = (f"Headings in {rel}:\n" + "\n".join(outline) + "\n"
           + (f"{_cap(_n(len(skips), 'problem'))}: " + "; ".join(skips) + "." if skips
              else "No levels are skipped."))
    q = _ask(rng, "html_heading_outline", rel)
    return [_draft("html_heading_outline", q, ans, root, rel, (r"(?i)<h[1-6]\b", heads, True))]


def _landmarks(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    found: list[tuple[Element, str]] = []
    for e in doc.elements:
        role = e.attr("role") or ""
        if role in _LANDMARK_ROLES:
            found.append((e, role))
        elif not role and e.tag in _LANDMARK_TAGS:  # header/footer in a section: no landmark
            scoped = e.tag in ("header", "footer") and any(
                a.tag in _SECTIONING for a in doc.ancestors(e))
            found.append((e, "" if scoped else _LANDMARK_TAGS[e.tag]))
    items = [f"- `<{e.tag}" + (f' role="{r}"' if e.attr("role") else "") + f">` on line {e.line}: "
             + (r + (f' ("{e.attr("aria-label")}")' if e.attr("aria-label") else "") if r
                else "inside a sectioning element, so not a page landmark") for e, r in found]
    roles = {r for _, r in found}
    missing = [r for r in ("banner", "navigation", "main", "contentinfo") if r not in roles]
    tail = ("It has no " + _join([f"`{r}`" for r in missing], "or") + " landmark." if missing
            else "It has all the usual page landmarks (banner, navigation, main, contentinfo).")
    ans = (f"{rel} defines these landmarks:\n" + "\n".join(items) + "\n" + tail if found else
           f"{rel} defines no landmarks: no header, nav, main, aside or footer element and no "
           "landmark role.")
    pattern = (r'(?i)<(header|nav|main|aside|footer)\b'
               r'|\brole="(banner|navigation|main|complementary|contentinfo|search)"')
    q = _ask(rng, "html_landmarks", rel)
    return [_draft("html_landmarks", q, ans, root, rel, (pattern, [e for e, _ in found], False))]


def _vague_links(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    links = [a for a in doc.find("a") if a.attr("href") is not None]
    if not links:
        return []
    words = lambda s: re.sub(r"[^\w ]", "", s.lower()).strip()
    vague = [a for a in links if words(_accessible_name(doc, a)) in _VAGUE]
    empty = [a for a in links if not words(_accessible_name(doc, a))]
    parts = [] if vague or empty else [
        f"No vague links: {_of(len(links), len(links), 'link')} text that names its target."]
    if vague:
        items = _join([f'"{a.text}" → `{a.attr("href")}` (line {a.line})' for a in vague])
        parts.append(f"{_cap(_of(len(vague), len(links), 'link'))} vague text: {items}.")
    if empty:
        items = _join([f"`{a.attr('href')}` (line {a.line})" for a in empty])
        parts.append(f"{_cap(_n(len(empty), 'link'))} {'has' if len(empty) == 1 else 'have'} "
                     f"no text at all: {items}.")
    for a in links:
        if a.attr("aria-label") and words(a.text) in _VAGUE and a not in vague:
            parts.append(f'The "{a.text}" link on line {a.line} is fine: its `aria-label` '
                         f'"{a.attr("aria-label")}" names the target.')
    q = _ask(rng, "html_vague_links", rel)
    return [_draft("html_vague_links", q, " ".join(parts), root, rel, (r"(?i)<a\b", links, True))]


def _button_names(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    buttons = doc.find("button")
    if not buttons:
        return []
    nameless = [b for b in buttons if not _accessible_name(doc, b)]
    if nameless:
        items = _join([f"{_short(b)} (line {b.line})" for b in nameless])
        ans = (f"{_cap(_of(len(nameless), len(buttons), 'button', _LACK))} an accessible name: "
               f"{items}. Give each visible text or an `aria-label`.")
    else:
        ans = f"No problems: {_of(len(buttons), len(buttons), 'button')} an accessible name."
    for b in buttons:
        if b.attr("title") and not (b.text or b.attr("aria-label") or b.attr("aria-labelledby")):
            ans += (f" The button on line {b.line} is named only by its `title` "
                    f'("{b.attr("title")}").')
    q = _ask(rng, "html_button_names", rel)
    return [_draft("html_button_names", q, ans, root, rel, (r"(?i)<button\b", buttons, True))]


def _lang(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    roots = doc.find("html")
    if len(roots) != 1:
        return []
    el, lang = roots[0], roots[0].attr("lang")
    ans = (f'The `<html>` tag on line {el.line} declares `lang="{lang}"`.' if lang else
           f"None is declared: the `<html>` tag on line {el.line} has no `lang` attribute, so "
           'screen readers have to guess the language. Add one, such as `lang="en"`.')
    return [_draft("html_lang", _ask(rng, "html_lang", rel), ans, root, rel,
                   (r"(?i)<html\b", roots, False))]


def _tabindex(doc: Document, root: Path, rel: str, rng: random.Random) -> list[_Draft]:
    els = [e for e in doc.elements if e.attr("tabindex") is not None]
    if not els and rng.random() < 0.7:  # keep some "none" answers, not one per page
        return []
    positive = [e for e in els if re.fullmatch(r"\s*0*[1-9]\d*\s*", e.attr("tabindex") or "")]
    parts = [] if els else [f"No element in {rel} has a `tabindex`."]
    if positive:
        items = _join([f'{_short(e)} with `tabindex="{e.attr("tabindex")}"` (line {e.line})'
                       for e in positive])
        parts.append(f"Positive values: {items}. They jump ahead of the normal tab order; use 0 "
                     "or remove them.")
    rest = [e for e in els if e not in positive]
    if rest:
        items = _join([f'`tabindex="{e.attr("tabindex")}"` on line {e.line}' for e in rest])
        parts.append(("Also " if positive else "No positive values: ") + f"{items}, which "
                     + ("does" if len(rest) == 1 else "do") + " not change the tab order.")
    q = _ask(rng, "html_tabindex", rel)
    return [_draft("html_tabindex", q, " ".join(parts), root, rel, (r"(?i)tabindex", els, False))]


KINDS: dict[str, Kind] = {
    "html_unlabeled_inputs": _unlabeled_inputs, "html_form_fields": _form_fields,
    "html_missing_alt": _missing_alt, "html_table_headers": _table_headers,
    "html_heading_outline": _heading_outline, "html_landmarks": _landmarks,
    "html_vague_links": _vague_links, "html_button_names": _button_names, "html_lang": _lang,
    "html_tabindex": _tabindex, "html_direct_required": _direct_required,
}


# ---- driver ------------------------------------------------------------------------------------


def _example(draft: _Draft, root: Path, source: str, commit: str, rel: str,
             doc: Document) -> Example | None:
    """Run the draft's tool and wrap it all as an Example; None when the tool refuses."""
    messages = [chat.system(source), chat.user(draft.question)]
    calls = ([("grep", {"pattern": draft.locate, "path": rel})] if draft.locate else []) + (
        [(draft.tool, draft.arguments)] if draft.tool is not None else [])
    for k, (tool, arguments) in enumerate(calls, 1):
        result = tools.execute(root, tool, arguments)
        if result.startswith("error:"):
            return None
        messages += [chat.tool_call(f"call_{k}", tool, arguments),
                     chat.tool_result(f"call_{k}", tool, result)]
    messages.append(chat.assistant(draft.answer))
    cited = [int(n) for n in re.findall(r"\bline (\d+)", draft.answer)]
    start, end = draft.span or ((min(cited), max(cited)) if cited else (1, doc.line_count))
    return Example(tuple(messages), tuple(chat.tool_schemas()), source, commit, rel, start, end,
                   draft.kind, HTML_GENERATOR_VERSION)


def html_examples(root: Path, source: str, commit: str, seed: str = "",
                  split: tuple[float, float, str] | None = None) -> tuple[list[Example], dict[str, int]]:
    """Grounded examples for every .html file under `root`, plus counts of documents and drops.
    With the dataset's `split` (valid, test, salt), a file whose examples land in test gets the
    test-only wordings."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"HTML root {root} is not a directory")
    stats: Counter[str] = Counter(documents=0, examples=0)
    examples: list[Example] = []
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in (".html", ".htm")
                    and p.is_file() and not p.is_symlink()
                    and ".git" not in p.relative_to(root).parts),
                   key=lambda p: p.relative_to(root).as_posix())
    for file in files:
        rel, data = file.relative_to(root).as_posix(), file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["dropped_not_utf8"] += 1
            continue
        if not text.strip() or len(data) > tools.MAX_FILE_BYTES or b"\0" in data[:8192]:
            stats["dropped_empty" if not text.strip() else "dropped_unreadable"] += 1
            continue
        if len(text.splitlines()) > tools.MAX_READ_LINES:
            stats["dropped_too_long"] += 1  # one read_file call would not show the whole file
            continue
        try:
            doc = parse_document(data)
        except RecursionError:  # thousands of unclosed, nested elements
            stats["dropped_too_deep"] += 1
            continue
        if doc.has_error or len(text.splitlines()) != doc.line_count:  # a lone \r or \f splits
            stats["dropped_parse_error" if doc.has_error else "dropped_line_mismatch"] += 1
            continue
        stats["documents"] += 1
        in_test = split is not None and split_of(source, rel, *split) == "test"
        for kind, make in KINDS.items():
            rng = _Rng(f"{seed}:{source}:{rel}:{kind}")
            rng.test = in_test
            for draft in make(doc, root, rel, rng):
                example = _example(draft, root, source, commit, rel, doc)
                if example is None:
                    stats["dropped_tool_error"] += 1
                    continue
                examples.append(example)
                stats[f"kind_{kind}"] += 1
    stats["examples"] = len(examples)
    return examples, dict(stats)
