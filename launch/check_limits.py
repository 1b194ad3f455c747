#!/usr/bin/env python3
"""Size limits of the online code (issue 14): no source file under engine/, worker/,
coordinator/ over 800 lines, no function there over 200 lines.

  launch/check_limits.py [--root DIR] [--max-file N] [--max-function N] [FOLDER...]
  launch/check_limits.py --self-test

Exit 0: clean. Exit 1: one line per offender on stdout ("file:line: function NAME is N lines
(limit 200)", "file: N lines (limit 800)"). Exit 2: bad arguments (one line on stderr).

A function is a brace block at namespace or class scope whose header (the text since the
previous ';', '{' or '}') holds a parameter list: free functions, member functions defined in
or out of their class, constructors, lambdas bound at namespace scope. Its length runs from
the first line of its header to its closing brace; lambdas and local classes inside it count
as its lines. Comments, string and character literals and preprocessor lines are blanked
first, so braces inside them do not count.

Standard library only: CI and the GPU machine run it without a virtual environment.
"""

import argparse
import os
import re
import sys

FOLDERS = ("engine", "worker", "coordinator")
SOURCE_EXTS = (".h", ".hh", ".hpp", ".cc", ".cpp", ".cu", ".cuh", ".inl")
CONTAINER_RE = re.compile(r"\b(namespace|class|struct|union|enum)\b")
CONTROL_RE = re.compile(r"^\s*(if|for|while|switch|catch|do|else|try)\b")
NAME_RE = re.compile(r"([~A-Za-z_][A-Za-z0-9_:~<>]*|operator\s*\S+)\s*$")


def blank_code(text):
    """Comments, literals and preprocessor lines replaced by spaces; newlines kept."""
    out = []
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c in " \t":
            out.append(c)
            i += 1
            continue
        if line_start and c == "#":  # preprocessor line, with continuations
            while i < n and text[i] != "\n":
                if text[i] == "\\" and i + 1 < n and text[i + 1] == "\n":
                    out.append(" \n")
                    i += 2
                    continue
                out.append(" ")
                i += 1
            continue
        line_start = False
        if text.startswith("//", i):
            while i < n and text[i] != "\n":
                out.append(" ")
                i += 1
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
            continue
        m = re.match(r'R"([^(\s]*)\(', text[i:i + 20])
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            close = ")" + m.group(1) + '"'
            end = text.find(close, i + len(m.group(0)))
            end = n if end < 0 else end + len(close)
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
            continue
        if c in "\"'":
            # A digit separator (1'000) is not a character literal.
            if c == "'" and i > 0 and text[i - 1].isalnum() and i + 1 < n and text[i + 1].isalnum():
                out.append(" ")
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(" " * (min(j + 1, n) - i))
            i = j + 1
            continue
        if c == "\n":
            line_start = True
        out.append(c)
        i += 1
    return "".join(out)


def functions(text):
    """(name, first line, lines) of every function at namespace or class scope."""
    code = blank_code(text)
    found = []
    stack = []  # per open brace: "container", "function" or "other"
    header_start = 0  # index just after the previous ';', '{' or '}' at container level
    fn_start_line = 0
    fn_name = ""
    fn_depth = 0
    for i, c in enumerate(code):
        in_function = "function" in stack
        if c == "{":
            if in_function:
                stack.append("other")
                continue
            header = code[header_start:i]
            stripped = header.strip()
            kind = "other"
            if CONTAINER_RE.search(stripped) and "(" not in stripped.split("{")[0]:
                kind = "container"
            elif stripped.startswith("extern") and stripped.endswith('"') or stripped == "extern":
                kind = "container"
            elif "(" in stripped and ")" in stripped and not CONTROL_RE.match(stripped):
                kind = "function"
            elif CONTAINER_RE.search(stripped):
                kind = "container"
            if kind == "function":
                lead = len(header) - len(header.lstrip())
                fn_start_line = code.count("\n", 0, header_start + lead) + 1
                name_part = stripped[:stripped.find("(")]
                m = NAME_RE.search(name_part)
                fn_name = m.group(1) if m else "<lambda>"
                fn_depth = len(stack)
            stack.append(kind)
            header_start = i + 1
        elif c == "}":
            if not stack:
                continue
            kind = stack.pop()
            if kind == "function" and len(stack) == fn_depth:
                end_line = code.count("\n", 0, i) + 1
                found.append((fn_name, fn_start_line, end_line - fn_start_line + 1))
            if "function" not in stack:
                header_start = i + 1
        elif c == ";" and not in_function:
            header_start = i + 1
    return found


def check(root, folders, max_file, max_function):
    problems = []
    for folder in folders:
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                if not f.endswith(SOURCE_EXTS):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
                n_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
                if n_lines > max_file:
                    problems.append(f"{rel}: {n_lines} lines (limit {max_file})")
                for name, line, length in functions(text):
                    if length > max_function:
                        problems.append(f"{rel}:{line}: function {name} is {length} lines "
                                        f"(limit {max_function})")
    return problems


def self_test():
    """The parser on fabricated sources: each case must find what it names."""
    body = "  x += 1;\n" * 5
    cases = [
        ("int f(int x) {\n" + body + "  return x;\n}\n", [("f", 1, 8)]),
        ("namespace a {\nstruct S {\n  void g() const {\n" + body + "  }\n  int y;\n};\n}\n",
         [("g", 3, 7)]),
        ("void S::h()\n    const {\n  if (x) {\n  }\n  auto l = [&] { return 1; };\n}\n",
         [("S::h", 1, 6)]),
        ('const char* s = "{";\n// }\nint k() { return \'}\'; }\n', [("k", 3, 1)]),
        ("int v[] = {1, 2};\nenum class E { kA, kB };\nint m(int a,\n      int b) {\n  return a;\n}\n",
         [("m", 3, 4)]),
        ("#define X {\nS::S(int a) : a_(a) {\n  for (;;) {\n  }\n}\n", [("S::S", 2, 4)]),
    ]
    bad = 0
    for src, want in cases:
        got = functions(src)
        if got != want:
            print(f"self-test: {src!r}: want {want}, got {got}")
            bad += 1
    if bad:
        return 1
    print(f"self-test: {len(cases)} cases pass")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--max-file", type=int, default=800)
    ap.add_argument("--max-function", type=int, default=200)
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("folders", nargs="*", default=list(FOLDERS))
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    for f in a.folders:
        if not os.path.isdir(os.path.join(a.root, f)):
            print(f"check_limits: no folder {f} under {a.root}", file=sys.stderr)
            return 2
    problems = check(a.root, a.folders, a.max_file, a.max_function)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
