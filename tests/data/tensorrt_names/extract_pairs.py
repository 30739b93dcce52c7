"""Extract the (class, attribute) pairs of TensorRT's Python API from NVIDIA's binding sources.

The tensorrt Python module is built from pybind11 sources in NVIDIA/TensorRT (python/src/**.cpp)
plus a small Python package (python/packaging/bindings_wheel/tensorrt/__init__.py). This script
reads them at one git revision of that repository and writes one pair per line:

    <Class> <attribute> [<keyword>,<keyword>,...]

- `tensorrt <Name>` for every module-level class, enum, function and Python-level name;
- `<Class> <name>` for `.def`, `.def_static`, `.def_property*`, `.def_readonly/readwrite` and
  `py::init` (as `__init__`) on a `py::class_`, and `.value` members of a `py::enum_`
  (`.export_values()` also puts them on the enclosing scope);
- nested classes and enums as `<Outer> <Inner>`, their own pairs under `<Outer>.<Inner>`;
- inherited attributes are listed under the subclass too (bases: the bound C++ types among
  `py::class_`'s template arguments);
- Python-level additions of __init__.py: `X.attr = ...`, and the `setattr(X, name, value)` loop
  over an enum's `__members__`;
- the keyword names of a method (pybind's `"name"_a` / `py::arg("name")`), merged over overloads.

Preprocessor: `#if EXPORT_ALL_BINDINGS` blocks are kept (the full `tensorrt` module defines it;
the lean and dispatch modules do not), every other `#if` condition is taken as false (its
`#else` branch is kept).

Regenerate (from a clone of NVIDIA/TensorRT; the revisions used are in each file's header):
    python tests/data/tensorrt_names/extract_pairs.py /path/to/TensorRT v10.16.1-commit tensorrt-10.16.pairs
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

DEF_METHODS = {"def", "def_static", "def_property", "def_property_readonly", "def_property_static",
               "def_property_readonly_static", "def_readwrite", "def_readonly", "def_readwrite_static",
               "def_readonly_static"}
ENUM_AUTO = ("name", "value", "__members__", "__int__", "__index__")
KEEP_IF = {"EXPORT_ALL_BINDINGS"}
INIT_PY = "python/packaging/bindings_wheel/tensorrt/__init__.py"


def git_show(repo: Path, rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_files(repo: Path, rev: str, under: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", rev, under], check=True,
                         capture_output=True, text=True).stdout
    return sorted(p for p in out.splitlines() if p.endswith(".cpp"))


def preprocess(text: str) -> str:
    """Keep the lines a full `tensorrt` build compiles (see the module docstring)."""
    out, stack = [], []  # stack of (this branch kept, any branch taken so far)
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", s)
        if m:
            kind, cond = m.group(1), m.group(2).split("//")[0].strip()
            if kind in ("if", "ifdef", "ifndef"):
                kept = cond in KEEP_IF if kind != "ifndef" else cond not in KEEP_IF
                stack.append((kept, kept))
            elif kind == "elif":
                taken = stack[-1][1]
                kept = not taken and cond in KEEP_IF
                stack[-1] = (kept, taken or kept)
            elif kind == "else":
                stack[-1] = (not stack[-1][1], True)
            else:
                stack.pop()
            out.append("")
            continue
        out.append(line if all(k for k, _ in stack) else "")
    return "\n".join(out)


def strip_comments(text: str) -> str:
    """Blank out // and /* */ comments, leaving string and char literals intact."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        elif text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(]*)\(', text[i:])
            end = text.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
            out.append(text[i:j])
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def match_bracket(text: str, i: int) -> int:
    """Index just past the bracket group opening at text[i] ('(', '{', '[' or '<')."""
    pairs = {"(": ")", "{": "}", "[": "]", "<": ">"}
    stack, j = [pairs[text[i]]], i + 1
    angle = text[i] == "<"
    while j < len(text) and stack:
        c = text[j]
        if c in "\"'":
            k = j + 1
            while k < len(text) and text[k] != c:
                k += 2 if text[k] == "\\" else 1
            j = k + 1
            continue
        if text.startswith('R"', j):
            m = re.match(r'R"([^(]*)\(', text[j:])
            if m:
                j = text.find(")" + m.group(1) + '"', j) + len(m.group(1)) + 2
                continue
        if c in "({[" or (angle and c == "<"):
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        j += 1
    return j


def split_args(inner: str) -> list[str]:
    """Top-level comma split of an argument list (brackets and strings respected)."""
    args, depth, start, j = [], 0, 0, 0
    while j < len(inner):
        c = inner[j]
        if c in "\"'":
            k = j + 1
            while k < len(inner) and inner[k] != c:
                k += 2 if inner[k] == "\\" else 1
            j = k + 1
            continue
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "<" and re.search(r"[A-Za-z_:]$", inner[start:j]):
            j = match_bracket(inner, j)
            continue
        elif c == "," and depth == 0:
            args.append(inner[start:j].strip())
            start = j + 1
        j += 1
    if inner[start:].strip():
        args.append(inner[start:].strip())
    return args


def string_literal(arg: str) -> str | None:
    m = re.fullmatch(r'"([^"\\]*)"', arg.strip())
    return m.group(1) if m else None


def keywords(args: list[str]) -> list[str]:
    found = []
    for a in args:
        found += re.findall(r'"(\w+)"_a\b', a) + re.findall(r'py::arg\(\s*"(\w+)"\s*\)', a)
    return found


class Bindings:
    def __init__(self) -> None:
        self.attrs: dict[str, dict[str, set[str]]] = defaultdict(dict)  # class -> attr -> keywords
        self.bases: dict[str, list[str]] = defaultdict(list)  # python class -> C++ base types
        self.cpp_to_py: dict[str, str] = {}
        self.enums: set[str] = set()

    def add(self, cls: str, attr: str, kws: list[str] = ()) -> None:
        self.attrs[cls].setdefault(attr, set()).update(kws)

    def flattened(self) -> dict[str, dict[str, set[str]]]:
        def all_attrs(cls: str, seen: frozenset[str] = frozenset()) -> dict[str, set[str]]:
            merged = {k: set(v) for k, v in self.attrs.get(cls, {}).items()}
            for base in self.bases.get(cls, []):
                py = self.cpp_to_py.get(base)
                if py and py not in seen:
                    for k, v in all_attrs(py, seen | {cls}).items():
                        merged.setdefault(k, set()).update(v)
            return merged

        return {cls: all_attrs(cls) for cls in list(self.attrs)}


def chain(text: str, i: int, on_call) -> int:
    """Walk `.method(args)` calls starting at text[i]; on_call(method, args) for each."""
    while True:
        j = skip_ws(text, i)
        if j >= len(text) or text[j] != ".":
            return i
        m = re.match(r"\.\s*(\w+)\s*", text[j:])
        if not m:
            return i
        k = j + m.end()
        if k >= len(text) or text[k] != "(":
            return i
        end = match_bracket(text, k)
        on_call(m.group(1), split_args(text[k + 1:end - 1]))
        i = end


def scan_cpp(text: str, b: Bindings) -> None:
    variables: dict[str, str] = {}  # C++ variable holding a py::class_ -> python class name
    decl = re.compile(r"py::(class_|enum_)\s*<")
    pos = 0
    events = []  # (position, kind, data) in source order
    for m in decl.finditer(text):
        if m.start() < pos:
            continue
        lt = m.end() - 1
        gt = match_bracket(text, lt)
        targs = split_args(text[lt + 1:gt - 1])
        k = skip_ws(text, gt)
        var = None
        vm = re.match(r"(\w+)\s*", text[k:])
        if vm and text[k + vm.end():k + vm.end() + 1] in "({":
            var, k = vm.group(1), k + vm.end()
        if k >= len(text) or text[k] not in "({":
            continue
        end = match_bracket(text, k)
        args = split_args(text[k + 1:end - 1])
        if len(args) < 2 or string_literal(args[1]) is None:
            continue
        events.append((m.start(), m.group(1), targs, var, args[0], string_literal(args[1]), end))
        pos = end
    for name in re.finditer(r"(?<![\w.])(\w+)\s*\.\s*(?=\w+\s*\()", text):
        events.append((name.start(), "var", name.group(1), name.end() - 1))
    events.sort(key=lambda e: e[0])
    consumed_until = 0
    for ev in events:
        if ev[0] < consumed_until:
            continue
        if ev[1] in ("class_", "enum_"):
            _, kind, targs, var, scope, pyname, end = ev
            outer = "tensorrt" if scope == "m" else variables.get(scope)
            if outer is None:
                raise ValueError(f"unknown scope {scope!r} of {pyname}")
            qual = pyname if outer == "tensorrt" else f"{outer}.{pyname}"
            b.add(outer, pyname)
            b.attrs.setdefault(qual, {})
            cpp = targs[0].split("::")[-1].strip()
            b.cpp_to_py[cpp] = qual
            b.cpp_to_py[targs[0].strip()] = qual
            if kind == "class_":
                b.bases[qual] += [t.strip() for t in targs[1:]]
            else:
                b.enums.add(qual)
                for auto in ENUM_AUTO:
                    b.add(qual, auto)
            if var:
                variables[var] = qual
            consumed_until = chain(text, end, member_adder(b, qual, outer))
        elif ev[1] == "var":
            _, _, var, dot = ev
            if var == "m":
                consumed_until = chain(text, dot, module_adder(b))
            elif var in variables:
                consumed_until = chain(text, dot, member_adder(b, variables[var], None))


def member_adder(b: Bindings, cls: str, outer: str | None):
    def on_call(method: str, args: list[str]) -> None:
        if method in DEF_METHODS and args:
            name = string_literal(args[0])
            if name is not None:
                b.add(cls, name, keywords(args[1:]))
            elif method == "def" and args[0].startswith("py::init"):
                b.add(cls, "__init__", keywords(args[1:]))
        elif method == "value" and args and string_literal(args[0]) is not None:
            b.add(cls, string_literal(args[0]))
        elif method == "export_values" and outer is not None:
            for attr in [a for a in b.attrs[cls] if a not in ENUM_AUTO]:
                b.add(outer, attr)

    return on_call


def module_adder(b: Bindings):
    def on_call(method: str, args: list[str]) -> None:
        if method in ("def", "attr") and args and string_literal(args[0]) is not None:
            b.add("tensorrt", string_literal(args[0]), keywords(args[1:]))

    return on_call


def scan_init_py(text: str, b: Bindings) -> None:
    """Names the Python package adds (templated with ##TENSORRT_MODULE## markers)."""
    text = re.sub(r"##(\w+)##", lambda m: "tensorrt" if m.group(1) == "TENSORRT_MODULE" else "X", text)
    tree = ast.parse(text)

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return f"{head}.{node.attr}" if head else None
        return None

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                b.add("tensorrt", node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        b.add("tensorrt", t.id)
                    elif isinstance(t, ast.Attribute) and dotted(t.value) in b.attrs:
                        b.add(dotted(t.value), t.attr)
            elif isinstance(node, ast.If) and "platform" not in ast.unparse(node.test):  # Windows-only DLL loading
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
                # for attr, value in <Enum>.__members__.items(): setattr(<Class>, attr, value)
                src = node.iter.func.value if isinstance(node.iter.func, ast.Attribute) else None
                enum = dotted(src.value) if isinstance(src, ast.Attribute) and src.attr == "__members__" else None
                for stmt in node.body:
                    call = stmt.value if isinstance(stmt, ast.Expr) else None
                    if (enum in b.attrs and isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                            and call.func.id == "setattr" and dotted(call.args[0]) in b.attrs):
                        for member in b.attrs[enum]:
                            if member not in ENUM_AUTO:
                                b.add(dotted(call.args[0]), member)

    visit(tree.body)
    b.add("tensorrt", "__version__")


def version_of(repo: Path, rev: str) -> str:
    header = git_show(repo, rev, "include/NvInferVersion.h")
    parts = [re.search(rf"#define TRT_{p}_ENTERPRISE (\d+)", header).group(1)
             for p in ("MAJOR", "MINOR", "PATCH", "BUILD")]
    return ".".join(parts)


def extract(repo: Path, rev: str) -> tuple[str, str, dict[str, dict[str, set[str]]]]:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    b = Bindings()
    for path in git_files(repo, commit, "python/src"):
        scan_cpp(strip_comments(preprocess(git_show(repo, commit, path))), b)
    scan_init_py(git_show(repo, commit, INIT_PY), b)
    return commit, version_of(repo, commit), b.flattened()


def main(argv: list[str]) -> None:
    repo, rev, out = Path(argv[0]), argv[1], Path(argv[2])
    commit, version, pairs = extract(repo, rev)
    lines = [f"# TensorRT {version} Python API: (class, attribute[, keywords]) pairs",
             f"# from NVIDIA/TensorRT commit {commit} (python/src/**/*.cpp, {INIT_PY})",
             "# generated by tests/data/tensorrt_names/extract_pairs.py; one pair per line"]
    for cls in sorted(pairs):
        for attr in sorted(pairs[cls]):
            kws = ",".join(sorted(pairs[cls][attr]))
            lines.append(f"{cls} {attr}" + (f" {kws}" if kws else ""))
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: TensorRT {version}, {sum(map(len, pairs.values()))} pairs in {len(pairs)} classes")


if __name__ == "__main__":
    main(sys.argv[1:])
