"""Short functions: every func, init and deinit in Sources/ is under MAX_LINES lines, counted
from its declaration's first line to its closing brace (issue 12). A longer one is split
into steps with names, not squeezed into fewer lines.

Braces are matched on the code alone: string literals (single-line, multi-line and raw, with
the code of their interpolations kept) and comments (// and nested /* */) are blanked first."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ROOT / "Sources"
MAX_LINES = 60

MODIFIERS = (
    r"public|private|fileprivate|internal|package|open|static|class|final|override|mutating|nonmutating"
    r"|nonisolated|convenience|required|dynamic|optional|consuming|borrowing|distributed"
)
DECLARATION = re.compile(
    r"^\s*(?:@\w+(?:\([^)]*\))?\s+)*(?:(?:" + MODIFIERS + r")(?:\([^)]*\))?\s+)*"
    r"(func\s+[^\s(<]+|init[?!]?(?=[\s(<])|deinit\b)"
)
# A declaration whose line ends without its body's brace goes on with one of these; a line
# that starts otherwise means the declaration had no body (a protocol requirement).
CONTINUATION = re.compile(
    r"^\s*(?:->|where\b|throws\b|rethrows\b|async\b|\{|\)"
    r"|(?!(?:var|let|case|func|init|subscript|typealias|associatedtype|static|class)\b)\w+(?:\s+\w+)?\s*:)"
)


def code_only(text):
    """`text` with every character of string literals and comments turned into a space,
    newlines kept, so that the lines stay where they were."""
    out = []
    # Frames: ("code", parens) for the file and each interpolation, ("string", multi, hashes),
    # ("comment",) for /* */, which nests.
    stack = [("code", 0)]
    i, n = 0, len(text)

    def blank(s):
        out.append(re.sub(r"[^\n]", " ", s))

    while i < n:
        frame = stack[-1]
        c = text[i]
        if frame[0] == "comment":
            if text.startswith("/*", i):
                stack.append(("comment",))
                blank("/*")
                i += 2
            elif text.startswith("*/", i):
                stack.pop()
                blank("*/")
                i += 2
            else:
                blank(c)
                i += 1
        elif frame[0] == "string":
            _, multi, hashes = frame
            close = ('"""' if multi else '"') + "#" * hashes
            escape = "\\" + "#" * hashes
            if text.startswith(escape + "(", i):
                stack.append(("code", 0))
                blank(escape + "(")
                i += len(escape) + 1
            elif text.startswith(escape, i):
                blank(text[i:i + len(escape) + 1])
                i += len(escape) + 1
            elif text.startswith(close, i):
                stack.pop()
                blank(close)
                i += len(close)
            elif c == "\n" and not multi:
                # Not valid Swift; recover at the end of the line.
                stack.pop()
                out.append(c)
                i += 1
            else:
                blank(c)
                i += 1
        else:
            raw = re.match(r'(#*)("""|")', text[i:i + 64]) if c in '#"' else None
            if text.startswith("//", i):
                end = text.find("\n", i)
                end = n if end < 0 else end
                blank(text[i:end])
                i = end
            elif text.startswith("/*", i):
                stack.append(("comment",))
                blank("/*")
                i += 2
            elif raw:
                stack.append(("string", raw.group(2) == '"""', len(raw.group(1))))
                blank(raw.group(0))
                i += len(raw.group(0))
            elif c == "(":
                stack[-1] = ("code", frame[1] + 1)
                out.append(c)
                i += 1
            elif c == ")" and len(stack) > 1 and frame[1] == 0:
                # The end of an interpolation: back in its string.
                stack.pop()
                blank(c)
                i += 1
            elif c == ")":
                stack[-1] = ("code", frame[1] - 1)
                out.append(c)
                i += 1
            else:
                out.append(c)
                i += 1
    return "".join(out)


def body_end(lines, start):
    """The index of the line that closes the body of the declaration on lines[start], or None
    when it has no body. Before the body, braces inside parentheses (a default argument's
    closure) are not the body's."""
    parens, depth = 0, None
    for j in range(start, len(lines)):
        line = lines[j]
        if depth is None and j > start and line.strip() and not CONTINUATION.match(line):
            return None
        for ch in line:
            if depth is None:
                if ch == "(":
                    parens += 1
                elif ch == ")":
                    parens -= 1
                elif ch == "{" and parens == 0:
                    depth = 1
                elif ch == "}" and parens == 0:
                    return None
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return j
    return None


def function_lengths(text):
    """(first line, name, lines) of every func, init and deinit with a body in Swift `text`."""
    lines = code_only(text).split("\n")
    found = []
    for start, line in enumerate(lines):
        m = DECLARATION.match(line)
        if not m:
            continue
        end = body_end(lines, start)
        if end is not None:
            found.append((start + 1, re.sub(r"\s+", " ", m.group(1)), end - start + 1))
    return found


def all_functions():
    result = []
    for path in sorted(SOURCES.rglob("*.swift")):
        for line, name, length in function_lengths(path.read_text()):
            result.append((f"{path.relative_to(ROOT)}:{line}", name, length))
    return result


def test_every_function_is_short():
    functions = all_functions()
    assert len(functions) > 500, "too few functions found: is the measure broken?"
    long = sorted((f for f in functions if f[2] >= MAX_LINES), key=lambda f: -f[2])
    assert not long, f"functions of {MAX_LINES} lines or more (split them into named steps):\n" + "\n".join(
        f"  {where} {name}: {length} lines" for where, name, length in long
    )


# The measure itself, on made-up Swift.

def body(lines):
    return "\n".join(f"    let x{k} = {k}" for k in range(lines))


@pytest.mark.parametrize("decl", [
    "func f() {", "public static func f<T>(_ t: T) -> Int {", "init() {", "init?(x: Int) {",
    "@discardableResult private mutating func f() {", "deinit {",
])
def test_counts_declaration_to_closing_brace(decl):
    assert [f[2] for f in function_lengths(f"{decl}\n{body(10)}\n}}\n")] == [12]


def test_signature_over_several_lines():
    src = "func f(\n    a: Int,\n    b: Int\n) -> Int {\n    a + b\n}\n"
    assert function_lengths(src) == [(1, "func f", 6)]


def test_braces_in_strings_and_comments_do_not_count():
    src = (
        'func f() {\n'
        '    let a = "}}}" // }\n'
        '    /* } /* nested } */ } */\n'
        '    let b = #"}"\\"}"#\n'
        '    let c = """\n'
        '        }\n'
        '        """\n'
        '    let d = "\\(g { "}" }) }"\n'
        '}\n'
        'func g() {}\n'
    )
    assert function_lengths(src) == [(1, "func f", 9), (10, "func g", 1)]


def test_closure_in_a_default_argument_is_not_the_body():
    src = "func f(g: () -> String = { \"\" }) async {\n    g()\n}\n"
    assert function_lengths(src) == [(1, "func f", 3)]


def test_requirement_without_body_is_skipped():
    src = "protocol P {\n    func a()\n    var b: Int { get }\n    func c() -> Int\n}\nfunc d() {\n}\n"
    assert function_lengths(src) == [(6, "func d", 2)]


def test_long_function_is_found():
    src = f"struct S {{\n    func long() {{\n{body(MAX_LINES)}\n    }}\n}}\n"
    assert function_lengths(src) == [(2, "func long", MAX_LINES + 2)]
