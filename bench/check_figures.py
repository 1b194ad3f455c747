#!/usr/bin/env python3
"""Check that the figures shown outside bench/NOTES.md are figures of bench/NOTES.md.

README.md's "## Measured" section holds one summary table whose columns include
"measured" and "NOTES" (a section reference such as "§5"). Every number in a row's
measured cell must occur in that section of NOTES.md (a top-level "# 5. ..." heading up to
the next one), as the same digits: 0.96 matches "0.96 GB/s" but not "0.964x". With
--docs FILE..., every number in the markdown tables of those files must occur in NOTES
section --docs-section (default 8: the copies of the accuracy tables). With --results DIR,
every file in DIR must be cited by NOTES.md (as results/NAME; * and {a,b} patterns count)
and every citation must name an existing file.

Exit status: 0 all found; 1 one line per missing figure; 2 the README table, a section or
a file is missing. --self-test first checks the checker on planted mismatches.
Python 3 standard library only.
"""
import argparse
import fnmatch
import os
import re
import sys
import tempfile

# A figure: digits with optional thousands groups and decimals, not glued to a word
# before it ("tp1", "sp4" and "v2" are names, not figures).
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.])\d+(?:\.\d+)?(?![\d])")
SECTION_HEADING = re.compile(r"^# (\d+)\.\s")


class Structure(Exception):
    """The input does not have the shape the check needs (exit 2)."""


def numbers(text):
    return [m.group(0) for m in NUMBER.finditer(text)]


def occurs(figure, text):
    """`figure` in `text` as the same number; thousands separators may differ."""
    plain = figure.replace(",", "")
    whole, _, frac = plain.partition(".")
    groups = []
    while len(whole) > 3:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    digits = ",?".join([whole] + groups) + (r"\." + frac if frac else "")
    # Not inside a longer number; a comma before is allowed ("(1000,6096)" lists pairs).
    return re.search(r"(?<![\d.])" + digits + r"(?!\d)(?!\.\d)(?!,\d{3}(?!\d))", text) is not None


def notes_sections(path):
    """Section number -> text of that top-level section (0 = the text before section 1)."""
    sections, current, lines = {}, 0, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = SECTION_HEADING.match(line)
            if m:
                sections[current] = "".join(lines)
                current, lines = int(m.group(1)), []
            lines.append(line)
    sections[current] = "".join(lines)
    return sections


def table_rows(lines, first):
    """(line number, cells) of the markdown table starting at or after index `first`."""
    i = first
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        if lines[i].startswith("## "):
            return []
        i += 1
    rows = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
        if not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            rows.append((i + 1, cells))
        i += 1
    return rows


def check_readme(readme, sections, notes_name):
    with open(readme, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.rstrip() == "## Measured"), None)
    if start is None:
        raise Structure(f"{readme}: no '## Measured' section")
    rows = table_rows(lines, start + 1)
    if len(rows) < 2:
        raise Structure(f"{readme}: no summary table under '## Measured'")
    header = [c.lower() for c in rows[0][1]]
    if "measured" not in header or "notes" not in header:
        raise Structure(f"{readme}:{rows[0][0]}: the table needs columns 'measured' and 'NOTES'")
    col_fig, col_sec = header.index("measured"), header.index("notes")
    errors, count = [], 0
    for lineno, cells in rows[1:]:
        where = f"{readme}:{lineno}"
        if len(cells) != len(header):
            errors.append(f"{where}: {len(cells)} cells, the header has {len(header)}")
            continue
        m = re.fullmatch(r"§\s*(\d+)", cells[col_sec])
        if not m:
            errors.append(f"{where}: NOTES cell '{cells[col_sec]}' is not a section like §5")
            continue
        sec = int(m.group(1))
        if sec not in sections:
            errors.append(f"{where}: {notes_name} has no section {sec}")
            continue
        figures = numbers(cells[col_fig])
        if not figures:
            errors.append(f"{where}: no figure in the measured cell '{cells[col_fig]}'")
        for fig in figures:
            count += 1
            if not occurs(fig, sections[sec]):
                errors.append(f"{where}: figure {fig} ('{cells[col_fig]}') is not in "
                              f"{notes_name} section {sec}")
    return errors, count, len(rows) - 1


def check_doc(doc, text, section, notes_name):
    errors, count = [], 0
    with open(doc, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        for cell in line.strip().strip("|").split("|"):
            cell = re.sub(r"!\[[^]]*\]\([^)]*\)|`[^`]*`", "", cell)  # images, code
            for fig in numbers(cell):
                count += 1
                if not occurs(fig, text):
                    errors.append(f"{doc}:{i + 1}: figure {fig} ('{cell.strip()}') is not in "
                                  f"{notes_name} section {section}")
    return errors, count


def expand_braces(pattern):
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [q for alt in m.group(1).split(",")
            for q in expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def check_results(results, notes_text, notes_name):
    """Files of `results` not cited by NOTES, and NOTES citations that match no file."""
    files = set(os.listdir(results))
    cited, errors = set(), []
    for m in re.finditer(r"results/([A-Za-z0-9_.*{},-]+)", notes_text):
        cite = m.group(1).rstrip(".,")
        for pattern in expand_braces(cite):
            hits = {f for f in files if fnmatch.fnmatchcase(f, pattern)}
            if not hits:
                line = notes_text.count("\n", 0, m.start()) + 1
                errors.append(f"{notes_name}:{line}: results/{pattern} matches no file in {results}")
            cited |= hits
    for f in sorted(files - cited):
        errors.append(f"{results}/{f}: not cited by {notes_name} (cite it or git rm it)")
    return errors, len(files)


def run(readme, notes, docs, docs_section, results=None):
    """Returns (errors, summary line); raises Structure."""
    if not os.path.isfile(notes):
        raise Structure(f"{notes}: not found")
    sections = notes_sections(notes)
    errors, figs, rows = check_readme(readme, sections, notes)
    doc_figs = 0
    for doc in docs:
        if docs_section not in sections:
            raise Structure(f"{notes}: no section {docs_section} for --docs")
        if not os.path.isfile(doc):
            raise Structure(f"{doc}: not found")
        e, n = check_doc(doc, sections[docs_section], docs_section, notes)
        errors += e
        doc_figs += n
    summary = f"{figs} figures in {rows} rows of {readme}"
    if docs:
        summary += f" and {doc_figs} in the tables of {len(docs)} docs"
    if results is not None:
        if not os.path.isdir(results):
            raise Structure(f"{results}: not a folder")
        with open(notes, encoding="utf-8") as f:
            e, n = check_results(results, f.read(), notes)
        errors += e
        summary += f", the {n} files of {results} and their citations"
    return errors, summary


def self_test():
    """The check must fail on planted mismatches and pass on a matching pair."""
    notes = ("# Notes\n\nintro 7.5\n\n# 1. One\n\nspeed 1.23x, 10,326 ms\n\n"
             "# 2. Two\n\nTTFT 4.56 s, 10,326 ms\n\n| a | 0.938 |\n")
    good = ("# R\n\n## Measured\n\n| what | measured | NOTES |\n|---|---|---|\n"
            "| a | 1.23x | §1 |\n| b | 4.56 s, 10326 ms | §2 |\n\n## Next\n")
    bad = ("# R\n\n## Measured\n\n| what | measured | NOTES |\n|---|---|---|\n"
           "| a | 1.23x | §2 |\n| b | 4.5 s | §2 |\n| c | 9.99 | §1 |\n| d | 1.23x | 1 |\n"
           "| e | 1.2 | §9 |\n")
    doc_good, doc_bad = "| x | 0.938 |\n", "| x | 0.93 |\n"
    notes += "\nraw `results/run_{a,b}_x.json`, `results/log_*.txt`\n"
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, text in (("NOTES.md", notes), ("good.md", good), ("bad.md", bad),
                           ("doc_good.md", doc_good), ("doc_bad.md", doc_bad),
                           ("none.md", "# R\n\n## Other\n")):
            paths[name] = os.path.join(d, name)
            with open(paths[name], "w", encoding="utf-8") as f:
                f.write(text)
        res = os.path.join(d, "results")
        os.mkdir(res)
        for name in ("run_a_x.json", "run_b_x.json", "log_1.txt"):
            open(os.path.join(res, name), "w").close()
        errs, _ = run(paths["good.md"], paths["NOTES.md"], [paths["doc_good.md"]], 2, res)
        if errs:
            return [f"self-test: a matching README was refused: {errs}"]
        os.remove(os.path.join(res, "run_b_x.json"))
        open(os.path.join(res, "extra.json"), "w").close()
        errs, _ = run(paths["bad.md"], paths["NOTES.md"], [paths["doc_bad.md"]], 2, res)
        # 1.23 not in §2; 4.5 is not 4.56; 9.99 nowhere; "1" is no section; §9 absent; 0.93;
        # a citation without its file; a file without a citation.
        want = ["figure 1.23", "figure 4.5 ", "figure 9.99", "not a section", "no section 9",
                "figure 0.93 ", "results/run_b_x.json matches no file", "extra.json: not cited"]
        missing = [w for w in want if not any(w in e for e in errs)]
        if missing or len(errs) != len(want):
            return [f"self-test: planted mismatches {want}, got {errs}"]
        try:
            run(paths["none.md"], paths["NOTES.md"], [], 8)
            return ["self-test: a README without '## Measured' was accepted"]
        except Structure:
            pass
    return []


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=os.path.join(root, "README.md"))
    ap.add_argument("--notes", default=os.path.join(root, "bench", "NOTES.md"))
    ap.add_argument("--docs", nargs="*", default=[], metavar="FILE")
    ap.add_argument("--docs-section", type=int, default=8)
    ap.add_argument("--results", metavar="DIR", help="also check the citations of DIR's files")
    ap.add_argument("--self-test", action="store_true",
                    help="first check the checker on planted mismatches")
    a = ap.parse_args()
    if a.self_test:
        errs = self_test()
        if errs:
            print("\n".join(errs), file=sys.stderr)
            return 2
    try:
        errors, summary = run(a.readme, a.notes, a.docs, a.docs_section, a.results)
    except (Structure, OSError) as e:
        print(f"check_figures: error: {e}", file=sys.stderr)
        return 2
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"check_figures: {len(errors)} problem(s); checked {summary} against {a.notes}",
              file=sys.stderr)
        return 1
    print(f"check_figures: ok: checked {summary} against {a.notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
