"""Tests for codeadapt.extract: golden fixture, ast agreement, robustness, JSON round trip."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from codeadapt import extract
from codeadapt.extract import (
    EXTRACTOR_VERSION,
    extract_checkout,
    extract_file,
    extraction_from_json,
    extraction_to_json,
)
from codeadapt.records import Extraction, FileInfo

FIXTURES = Path(__file__).parent / "fixtures" / "languages" / "python"
GOLDEN = FIXTURES / "expected_symbols.json"


def _golden_view(info: FileInfo) -> dict[str, Any]:
    """What the golden file pins for one file."""
    return {
        "module_docstring": info.module_docstring,
        "has_syntax_error": info.has_syntax_error,
        "imports": [extract._record_to_json(i) for i in info.imports],
        "symbols": [extract._record_to_json(s) for s in info.symbols],
    }


def _ast_view(source: bytes) -> tuple[str, list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Module docstring, symbols and imports computed with `ast`, under the extractor's rules."""
    source = source.removeprefix(b"\xef\xbb\xbf")
    tree = ast.parse(source)
    symbols: list[dict[str, Any]] = []
    starts = [0]  # byte offset of each line; ast.get_source_segment re-splits per call (slow)
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def segment(node: Any) -> str:
        if node is None:
            return ""
        begin = starts[node.lineno - 1] + node.col_offset
        return source[begin : starts[node.end_lineno - 1] + node.end_col_offset].decode()

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, prefix, in_class)
                continue
            is_class = isinstance(child, ast.ClassDef)
            symbols.append(
                {
                    "kind": "class" if is_class else ("method" if in_class else "function"),
                    "qualname": prefix + child.name,
                    "start_line": min([child.lineno] + [d.lineno for d in child.decorator_list]),
                    "def_line": child.lineno,
                    "end_line": child.end_lineno,
                    "docstring": ast.get_docstring(child) or "",
                    "decorators": tuple(segment(d) for d in child.decorator_list),
                    "bases": tuple(segment(b) for b in child.bases) if is_class else (),
                    "is_async": isinstance(child, ast.AsyncFunctionDef),
                    "return_annotation": segment(getattr(child, "returns", None)),
                }
            )
            if is_class:  # defs inside functions are skipped, as the extractor does
                visit(child, f"{prefix}{child.name}.", True)

    visit(tree, "", False)
    imports = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                names = (f"{a.name} as {a.asname}",) if a.asname else ()
                imports.append((n.lineno, n.col_offset, a.name, names))
        elif isinstance(n, ast.ImportFrom):
            module = "." * n.level + (n.module or "")
            names = tuple(a.name + (f" as {a.asname}" if a.asname else "") for a in n.names)
            imports.append((n.lineno, n.col_offset, module, names))
    imports.sort(key=lambda i: i[:2])  # stable: `import b, a` keeps its order
    return ast.get_docstring(tree) or "", symbols, [(i[0], i[2], i[3]) for i in imports]


def _mismatches(source: bytes, path: str) -> list[str]:
    """Every way extract_file disagrees with ast on one file."""
    doc, expected, imports = _ast_view(source)
    info = extract_file(source, path)
    problems = []
    if info.module_docstring != doc:
        problems.append(f"{path}: module docstring")
    if [(i.line, i.module, i.names) for i in info.imports] != imports:
        problems.append(f"{path}: imports")
    got = [{k: getattr(s, k) for k in e} for s, e in zip(info.symbols, expected)]
    if len(info.symbols) != len(expected):
        problems.append(f"{path}: {len(info.symbols)} symbols, ast has {len(expected)}")
    for g, e in zip(got, expected):
        problems += [f"{path}:{e['qualname']}: {k} {g[k]!r} != {e[k]!r}" for k in e if g[k] != e[k]]
    return problems


def _installed_dir(package: str) -> Path:
    """The site-packages directory of an installed package, or skip."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent


# --- golden fixture -----------------------------------------------------------------------


def test_golden_fixture() -> None:
    source = (FIXTURES / "sample.py").read_bytes()
    got = _golden_view(extract_file(source, "sample.py"))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert got == json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_fixture_symbol_details() -> None:
    info = extract_file((FIXTURES / "sample.py").read_bytes(), "sample.py")
    by_name = {s.qualname: s for s in info.symbols}
    assert "nested" not in by_name and "Local" not in by_name  # inside a function: skipped
    assert by_name["Point.Inner.deep"].kind == "method"
    assert by_name["Point"].signature == "class Point(ModelBase, Generic[T], metaclass=Meta)"
    assert by_name["Point"].bases == ("ModelBase", "Generic[T]")
    fetch = by_name["fetch"]
    assert fetch.is_async and fetch.signature == (
        "async def fetch(url: str, /, *, timeout: float = 5.0) -> bytes"
    )
    assert fetch.parameters == ("url: str", "/", "*", "timeout: float = 5.0")


def test_fixture_agrees_with_ast() -> None:
    assert _mismatches((FIXTURES / "sample.py").read_bytes(), "sample.py") == []


# --- agreement with ast on real code -------------------------------------------------------


@pytest.mark.parametrize("package", ["flask", "click"])
def test_agrees_with_ast_on_installed_package(package: str) -> None:
    root = _installed_dir(package)
    problems: list[str] = []
    files = list(extract.python_files(root))
    assert files
    for path in files:
        problems += _mismatches(path.read_bytes(), path.relative_to(root).as_posix())
    assert problems == []


@pytest.mark.parametrize(
    "source",
    [
        b'"""a\\nb\\tc\\x41\\101\\u00e9\\U0001F600\\N{BULLET}\\\\ \\\n cont"""\n',
        b'r"""raw \\n \\d"""\n',
        b'u"uni\\x41"\n',
        b"R\"A\" 'B'\n",
        b'("paren"\n "cat")\n',
        b'f"no"\n',
        b'b"bytes"\n',
        b'# c\n\n"""after comment"""\n',
        b'"doc"; x = 1\n',
        b'""\n',
        b'"""\n\tTabbed\n\t  more\n"""\n',
        b'\xef\xbb\xbf"""bom"""\ndef f():\n    "x"\n',
        b'"""crlf\r\n  two\r\n"""\r\ndef f():\r\n    """in\r\n    f"""\r\n    pass\r\n',
        b'def f():  # c\n    # d\n    """doc"""\n',
        b"def f():\n    x = 1\n    # trailing comment\n        # more\n",
        b'x = 1\n"""not a docstring"""\n',
        b'("x",)\n',
        b'"\\777\\0"\n',
        b'"\xc3\xa9\\xe9"\n',
        b"@a\n# c\n@b(\n  1,\n)\nasync def f(): pass\n",
        b"if True:\n    def g(): pass\nelse:\n    class K:\n        def m(self): pass\n",
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ast on "\\777"
def test_docstrings_and_spans_match_ast(source: bytes) -> None:
    assert _mismatches(source, "t.py") == []


def test_type_parameters_and_multiline_signature() -> None:
    source = b"class Box[T](Base[T]):\n    def get[U](\n        self,  # me\n        x: U = (\n 1,\n ),\n    ) -> T: ...\n"
    box, get = extract_file(source, "t.py").symbols
    assert box.signature == "class Box[T](Base[T])"
    assert get.signature == "def get[U](self, x: U = (1,)) -> T"
    assert get.parameters == ("self", "x: U = (\n 1,\n )")


# --- robustness ---------------------------------------------------------------------------


def test_mangled_real_files_never_raise() -> None:
    root = _installed_dir("flask")
    rng = random.Random(0)
    junk = [b"(", b'"""', b"def", b"\n  class", b"\\", b"@", b"\xc3"]
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        for _ in range(3):
            cut = rng.randrange(len(data) + 1)
            mangled = data[:cut] + rng.choice(junk) + data[cut + rng.randrange(50) :]
            info = extract_file(mangled, path.name)
            assert all(s.start_line <= s.def_line <= s.end_line for s in info.symbols)


def test_syntax_error_keeps_what_parses(tmp_path: Path) -> None:
    source = b'"""Doc."""\nclass A:\n    def ok(self):\n        return (\n    def g(self):\n        """G."""\n\ndef h(:\n    pass\n'
    (tmp_path / "broken.py").write_bytes(source)
    e = extract_checkout(tmp_path, "s", "c")
    (info,) = e.files
    assert info.has_syntax_error and e.stats["syntax_errors"] == 1
    assert info.module_docstring == "Doc."
    names = {s.qualname: s for s in info.symbols}
    assert {"A", "A.ok", "A.g"} <= set(names)
    assert names["A.g"].docstring == "G."


def test_drops_are_counted_and_symlinks_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "repo", tmp_path / "outside"
    (root / "pkg").mkdir(parents=True)
    outside.mkdir()
    (root / "good.py").write_bytes(b"def good(): pass\n")
    (root / "pkg" / "mod.py").write_bytes(b"import os\nclass M: pass\n")
    (root / "bin.py").write_bytes(b"x = 1\0\n")
    (root / "latin.py").write_bytes(b"# caf\xe9\n")
    (root / "big.py").write_bytes(b"#" * 101)
    (root / "notes.txt").write_bytes(b"def not_python(): pass\n")
    (root / ".git").mkdir()
    (root / ".git" / "hook.py").write_bytes(b"def hook(): pass\n")
    (outside / "secret.py").write_bytes(b"def secret(): pass\n")
    (root / "evil.py").symlink_to("/etc/passwd")
    (root / "trap.py").symlink_to(outside / "secret.py")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "pipe.py")  # opening it would block: must be dropped from lstat alone
    (root / "forged\nhit.py").write_bytes(b"def forged(): pass\n")  # would break grep's lines

    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k)
    )
    e = extract_checkout(root, "s", "c", max_file_bytes=100)

    assert [f.path for f in e.files] == ["good.py", "pkg/mod.py"]
    assert not [p for p in opened if Path(p).name in {"evil.py", "trap.py", "pipe.py"}]
    assert "secret" not in {s.name for s in e.symbols()}
    assert e.stats == {
        "files_seen": 10, "files_parsed": 2, "symbols": 2, "imports": 1, "syntax_errors": 0,
        "dropped_binary": 1, "dropped_non_utf8": 1, "dropped_oversize": 1,
        "dropped_symlink": 3, "dropped_special": 1, "dropped_unreadable": 0, "dropped_bad_name": 1,
    }  # fmt: skip
    drops = sum(v for k, v in e.stats.items() if k.startswith("dropped_"))
    assert e.stats["files_seen"] == e.stats["files_parsed"] + drops


def test_walk_order_is_deterministic(tmp_path: Path) -> None:
    for rel in ["b.py", "a/z.py", "a/b/c.py", "a_b.py", "A.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    paths = [f.path for f in extract_checkout(tmp_path, "s", "c").files]
    assert paths == sorted(paths) == ["A.py", "a/b/c.py", "a/z.py", "a_b.py", "b.py"]


def test_bad_arguments_raise_before_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        extract_checkout(tmp_path / "missing", "s", "c")
    with pytest.raises(ValueError, match="max_file_bytes"):
        extract_checkout(tmp_path, "s", "c", max_file_bytes=0)


# --- cache format -------------------------------------------------------------------------


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_bytes((FIXTURES / "sample.py").read_bytes())
    (tmp_path / "broken.py").write_bytes(b"def f(:\n    'x'\n")
    e = extract_checkout(tmp_path, "flask", "0123abcd")
    back = extraction_from_json(json.loads(json.dumps(extraction_to_json(e))))
    assert isinstance(back, Extraction) and back == e
    assert back.symbols() == e.symbols() and back.imports() == e.imports()


def test_json_from_another_version_is_refused() -> None:
    d = extraction_to_json(Extraction(source="s", commit="c", files=()))
    d["extractor_version"] = EXTRACTOR_VERSION + "-old"
    with pytest.raises(ValueError, match="extractor_version"):
        extraction_from_json(d)
