#!/usr/bin/env python3
"""Layering check: the folder table of docs/ARCHITECTURE.md against every project include.

Reads the markdown table whose header is `| folder | owns | may include |`. A C++/CUDA source
under folder A may `#include "B/..."` (B a folder of the table, or a relative path landing in B)
only if B == A or B is in A's "may include" cell. Whatever the table says, the pairs issue 14
names (decode -> worker, coordinator -> worker, engine -> search, worker <-> decode) are refused:
a table that allows one of them is an error.

  launch/check_layering.py [--root DIR] [--table FILE] [--allow FILE | --no-allow] [--list-edges]

Exit 0: clean. Exit 1: one line per problem on stdout (file:line: folder A may not include
folder B; an allowlist entry no include needs; a source in a folder the table does not cover or
marks `—`). Exit 2: bad arguments, table or allowlist (one line on stderr).
With --list-edges: prints the folder graph (A -> B, include count, status) and exits 0.

Standard library only: CI and the GPU machine run it without a virtual environment.
"""

import argparse
import os
import re
import subprocess
import sys

SOURCE_EXTS = (".h", ".hh", ".hpp", ".hxx", ".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".inl",
               ".ipp")
# Pairs issue 14 names; no table may allow them (allowlist entries may, while the move lasts).
NAMED_PAIRS = (("decode", "worker"), ("coordinator", "worker"), ("engine", "search"),
               ("worker", "decode"))
ALL = "all"
NO_SOURCES = "—"  # cell value: the folder holds no C++/CUDA source
HEADER = ["folder", "owns", "may include"]
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class InputError(Exception):
    """Bad table, allowlist or argument: one line on stderr, exit 2."""


def split_row(line):
    """Cells of a markdown table row; `\\|` is a literal pipe inside a cell."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", body)]


def folder_name(token, where):
    name = token.strip().strip("`").strip().rstrip("/")
    if not NAME_RE.match(name):
        raise InputError(f"{where}: '{token.strip()}' is not a folder name")
    return name


def parse_table(path):
    """Returns {folder: set of folders | ALL | NO_SOURCES}, validated."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the folder table: {e.strerror}")
    starts = [i for i, l in enumerate(lines)
              if l.lstrip().startswith("|") and [c.lower() for c in split_row(l)] == HEADER]
    if len(starts) != 1:
        raise InputError(f"{path}: expected exactly one table with header "
                         f"'| folder | owns | may include |', found {len(starts)}")
    rows = {}
    raw = {}
    i = starts[0] + 2  # skip the header and the |---| separator
    if i - 1 >= len(lines) or not re.match(r"^\s*\|[\s:|-]+\|?\s*$", lines[i - 1]):
        raise InputError(f"{path}:{i}: the folder table has no separator row under its header")
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        where = f"{path}:{i + 1}"
        cells = split_row(lines[i])
        if len(cells) != 3:
            raise InputError(f"{where}: a folder table row needs 3 cells, found {len(cells)}")
        folders = re.findall(r"`([^`]+)`", cells[0])
        if not folders:
            raise InputError(f"{where}: no folder name in backticks in '{cells[0]}'")
        for token in folders:
            name = folder_name(token, where)
            if name in rows:
                raise InputError(f"{where}: folder '{name}' has a second row")
            rows[name] = None
            raw[name] = (cells[2], where)
        i += 1
    if not rows:
        raise InputError(f"{path}: the folder table has no rows")
    for name, (cell, where) in raw.items():
        value = cell.strip()
        if value.lower() == "nothing":
            rows[name] = set()
        elif value.lower() == ALL:
            rows[name] = ALL
        elif value in (NO_SOURCES, "-", "–"):
            rows[name] = NO_SOURCES
        else:
            allowed = set()
            for token in value.split(","):
                dep = folder_name(token, where)
                if dep not in rows:
                    raise InputError(f"{where}: '{name}' may include '{dep}', "
                                     "which has no row in the table")
                allowed.add(dep)
            rows[name] = allowed
    for a, b in NAMED_PAIRS:
        for f in (a, b):
            if f not in rows:
                raise InputError(f"{path}: the folder table has no row for '{f}' "
                                 "(issue 14 names it)")
        if may_include(rows, a, b):
            raise InputError(f"{path}: the folder table lets {a} include {b}, "
                             "which issue 14 forbids")
    return rows


def may_include(rows, a, b):
    rule = rows[a]
    return a == b or rule == ALL or (isinstance(rule, set) and b in rule)


def parse_allow(path, rows):
    """Returns {(A, B): (line number, reason)}."""
    entries = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the allowlist: {e.strerror}")
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        pair, _, reason = text.partition("#")
        m = re.match(r"^(\S+)\s*->\s*(\S+)$", pair.strip())
        if not m:
            raise InputError(f"{path}:{n}: expected 'A -> B  # reason', got '{text}'")
        if not reason.strip():
            raise InputError(f"{path}:{n}: allowlist entry '{pair.strip()}' needs a reason "
                             "after '#'")
        a, b = (folder_name(x, f"{path}:{n}") for x in m.groups())
        for f in (a, b):
            if f not in rows:
                raise InputError(f"{path}:{n}: '{f}' has no row in the folder table")
        if (a, b) in entries:
            raise InputError(f"{path}:{n}: '{a} -> {b}' is listed twice")
        entries[(a, b)] = (n, reason.strip())
    return entries


def list_files(root):
    """Relative paths of the tree's files: tracked plus untracked-not-ignored when root is the
    top of a git work tree (so build and dependency folders never count), else a walk that skips
    hidden folders and CMake build folders."""
    try:
        if not os.path.exists(os.path.join(root, ".git")):
            raise FileNotFoundError(root)
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, timeout=30)
        if out.returncode == 0:
            files = sorted(set(p for p in out.stdout.decode("utf-8", "replace").split("\0") if p))
            return [p for p in files if os.path.isfile(os.path.join(root, p))]
    except (OSError, subprocess.TimeoutExpired):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                             and not os.path.exists(os.path.join(dirpath, d, "CMakeCache.txt")))
        rel = os.path.relpath(dirpath, root)
        files += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames)]
    return files


def include_target(src_rel, inc, rows):
    """The table folder an include names, or None (system, generated or same-folder headers)."""
    if inc.startswith("./") or inc.startswith("../"):
        resolved = os.path.normpath(os.path.join(os.path.dirname(src_rel), inc))
        if resolved.startswith(".."):
            return None
        first = resolved.split(os.sep)[0]
        return first if first in rows and os.sep in resolved else None
    first, sep, _ = inc.partition("/")
    return first if sep and first in rows else None


def scan(root, rows):
    """Returns (edges {(A, B): [(file, line, include)]}, problems [str])."""
    edges = {}
    problems = []
    unlisted = {}
    for rel in list_files(root):
        if not rel.endswith(SOURCE_EXTS) or os.sep not in rel:
            continue
        top = rel.split(os.sep)[0]
        if top.startswith("."):
            continue
        if top not in rows:
            unlisted.setdefault(top, rel)
            continue
        if rows[top] == NO_SOURCES:
            problems.append(f"{rel}: folder {top} is marked '{NO_SOURCES}' (no C++/CUDA "
                            "sources) in the folder table")
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError as e:
            problems.append(f"{rel}: cannot read: {e.strerror}")
            continue
        for n, line in enumerate(lines, 1):
            m = INCLUDE_RE.match(line)
            if not m:
                continue
            dep = include_target(rel, m.group(1), rows)
            if dep is not None:
                edges.setdefault((top, dep), []).append((rel, n, m.group(1)))
    for top, example in sorted(unlisted.items()):
        problems.append(f"{example}: folder {top} holds C++/CUDA sources but has no row in "
                        "the folder table")
    return edges, problems


def edge_status(rows, allow, a, b):
    if may_include(rows, a, b):
        return "allowed"
    return "allowlisted" if (a, b) in allow else "FORBIDDEN"


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(
        description="Check project includes against the folder table of docs/ARCHITECTURE.md.")
    parser.add_argument("--root", default=os.path.dirname(here),
                        help="repository root (default: the parent of this script's folder)")
    parser.add_argument("--table", help="markdown file with the folder table "
                        "(default: ROOT/docs/ARCHITECTURE.md)")
    parser.add_argument("--allow", help="allowlist of 'A -> B  # reason' lines "
                        "(default: ROOT/docs/layering_allow.txt when it exists)")
    parser.add_argument("--no-allow", action="store_true", help="use no allowlist")
    parser.add_argument("--list-edges", action="store_true",
                        help="print the folder dependency graph with include counts")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.root):
            raise InputError(f"--root {args.root}: not a directory")
        if args.allow and args.no_allow:
            raise InputError("--allow and --no-allow exclude each other")
        table = args.table or os.path.join(args.root, "docs", "ARCHITECTURE.md")
        rows = parse_table(table)
        allow_path = args.allow
        if allow_path is None and not args.no_allow:
            default = os.path.join(args.root, "docs", "layering_allow.txt")
            allow_path = default if os.path.exists(default) else None
        allow = parse_allow(allow_path, rows) if allow_path else {}
    except InputError as e:
        print(f"check_layering: {e}", file=sys.stderr)
        return 2

    edges, problems = scan(args.root, rows)

    if args.list_edges:
        cross = sorted((k, len(v)) for k, v in edges.items() if k[0] != k[1])
        width = max((len(f"{a} -> {b}") for (a, b), _ in cross), default=0)
        print(f"# folder -> folder  includes  status ({len(cross)} edges; self-includes "
              "not shown)")
        for (a, b), count in cross:
            print(f"{a + ' -> ' + b:<{width}}  {count:5d}  {edge_status(rows, allow, a, b)}")
        return 0

    used = set()
    violations = []
    for (a, b), sites in sorted(edges.items()):
        if may_include(rows, a, b):
            continue
        if (a, b) in allow:
            used.add((a, b))
            continue
        note = " (issue 14 names this pair)" if (a, b) in NAMED_PAIRS else ""
        for rel, n, inc in sites:
            violations.append(f"{rel}:{n}: folder {a} may not include folder {b} "
                              f"(\"{inc}\"){note}")
    for (a, b), (n, _) in sorted(allow.items(), key=lambda kv: kv[1][0]):
        if (a, b) not in used:
            problems.append(f"{allow_path}:{n}: allowlist entry '{a} -> {b}' matches no "
                            "forbidden include any more: delete it")
    for line in violations + problems:
        print(line)
    if violations or problems:
        print(f"check_layering: {len(violations)} forbidden includes, "
              f"{len(problems)} other problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
