#!/usr/bin/env python3
"""Fails skips that claim a missing file which exists.

    check_skips.py JUNIT_XML...

Reads ctest's JUnit reports (ctest --output-junit FILE). A test that skips because an
input is missing names it in its output on a line "SKIP-MISSING-FILE: <absolute path>"
(tests/testutil.h: missing_file, MPREFILL_SKIP_IF_MISSING; the scripts print the same).
For every skipped test (status "notrun" with <skipped>) whose output names a path that
exists here, prints one line "<test>: skipped for a missing file that exists: <path>".
Exit 0: none; 1: some (launch/test.sh counts each such test as failed, not skipped);
2: a report is missing or unreadable.
"""
import os
import re
import sys
import xml.etree.ElementTree as ET

MARKER = re.compile(r"^SKIP-MISSING-FILE: (.+?)\s*$", re.MULTILINE)


def offending(path):
    """(test name, [existing paths]) for each skipped test of one report."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("skipped") is None:
            continue
        text = "".join(e.text or "" for e in case.iter("system-out"))
        found = [p for p in MARKER.findall(text) if os.path.exists(p)]
        if found:
            out.append((case.get("name", "?"), sorted(set(found))))
    return out


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    bad = []
    for report in argv[1:]:
        try:
            bad += offending(report)
        except (OSError, ET.ParseError) as e:
            print(f"check_skips: cannot read {report}: {e}", file=sys.stderr)
            return 2
    for name, paths in bad:
        print(f"{name}: skipped for a missing file that exists: {', '.join(paths)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
