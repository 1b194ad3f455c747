#!/usr/bin/env python3
"""Self-test of launch/check_layering.py on small trees fabricated in a temp dir.

Every case runs the checker's main() and checks its exit code and output lines, so a checker
that lets a forbidden include through, or refuses an allowed one, fails here. main() runs in
this process (one python start for all cases keeps the test under a second on a busy CI
machine); one case runs the script as a subprocess to cover its exit status.
"""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch",
                      "check_layering.py")
_spec = importlib.util.spec_from_file_location("check_layering", SCRIPT)
check_layering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layering)

# The issue-14 folders must have rows; `low` and `high` are the two the cases play with.
TABLE = """\
# fabricated

| folder | owns | may include |
|---|---|---|
| `low/` | the bottom layer, with a \\| pipe in its cell | nothing |
| `high/` | the top layer | `low` |
| `worker/` | w | low |
| `decode/` | d | low, high |
| `coordinator/` | c | nothing |
| `engine/` | e | low |
| `search/` | s | engine |
| `tests/`, `tools/` | t | all |
| `data/` | no code | — |
"""


class CheckLayeringTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="layering_test_")
        self.root = self._tmp.name
        self.write("docs/ARCHITECTURE.md", TABLE)
        self.write("low/base.h", '#pragma once\n#include "low/inner.h"\n#include <vector>\n')
        self.write("low/inner.h", "#pragma once\n")
        # The allowed include.
        self.write("high/top.cc", '#include "high/top.h"\n#include "low/base.h"\n')
        self.write("high/top.h", "#pragma once\n")

    def tearDown(self):
        self._tmp.cleanup()

    def write(self, rel, text):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def run_check(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = check_layering.main(["--root", self.root, *args])
        return rc, out.getvalue().splitlines(), err.getvalue()

    def test_allowed_include_passes(self):
        rc, out, err = self.run_check()
        self.assertEqual((rc, out), (0, []), err)

    def test_script_exit_status(self):
        def run():
            return subprocess.run([sys.executable, SCRIPT, "--root", self.root],
                                  capture_output=True, text=True, timeout=30)
        self.assertEqual(run().returncode, 0)
        self.write("low/bad.cc", '#include "high/top.h"\n')
        p = run()
        self.assertEqual((p.returncode, p.stdout.splitlines()),
                         (1, ['low/bad.cc:1: folder low may not include folder high '
                              '("high/top.h")']))
        self.assertIn("1 forbidden includes", p.stderr)

    def test_forbidden_include_fails_with_file_and_line(self):
        self.write("low/bad.cc", '// low must not look up\n\n#  include "high/top.h"  // x\n')
        rc, out, _ = self.run_check()
        self.assertEqual(rc, 1)
        self.assertEqual(out, ['low/bad.cc:3: folder low may not include folder high '
                               '("high/top.h")'])
        # Removing the violation makes it pass again.
        os.remove(os.path.join(self.root, "low/bad.cc"))
        self.assertEqual(self.run_check()[:2], (0, []))

    def test_relative_include_into_another_folder_is_caught(self):
        self.write("low/sub/rel.cu", '#include "../../high/top.h"\n#include "../inner.h"\n')
        rc, out, _ = self.run_check()
        self.assertEqual(rc, 1)
        self.assertEqual(out, ['low/sub/rel.cu:1: folder low may not include folder high '
                               '("../../high/top.h")'])

    def test_named_pair_is_marked(self):
        self.write("decode/d.cc", '#include "worker/w.h"\n')
        self.write("worker/w.h", "#pragma once\n")
        rc, out, _ = self.run_check()
        self.assertEqual(rc, 1)
        self.assertEqual(out, ['decode/d.cc:1: folder decode may not include folder worker '
                               '("worker/w.h") (issue 14 names this pair)'])

    def test_allowlist_covers_a_pair_and_stale_entries_fail(self):
        self.write("low/bad.cc", '#include "high/top.h"\n')
        self.write("allow.txt", "# comment\n\nlow -> high  # moved later\n")
        self.assertEqual(self.run_check("--allow", os.path.join(self.root, "allow.txt"))[:2],
                         (0, []))
        os.remove(os.path.join(self.root, "low/bad.cc"))
        rc, out, _ = self.run_check("--allow", os.path.join(self.root, "allow.txt"))
        self.assertEqual(rc, 1)
        self.assertEqual(len(out), 1)
        self.assertIn("allow.txt:3: allowlist entry 'low -> high' matches no forbidden include",
                      out[0])

    def test_default_allowlist_is_docs_layering_allow(self):
        self.write("low/bad.cc", '#include "high/top.h"\n')
        self.write("docs/layering_allow.txt", "low -> high  # moved later\n")
        self.assertEqual(self.run_check()[0], 0)
        self.assertEqual(self.run_check("--no-allow")[0], 1)

    def test_allowlist_without_reason_is_refused(self):
        self.write("allow.txt", "low -> high\n")
        rc, out, err = self.run_check("--allow", os.path.join(self.root, "allow.txt"))
        self.assertEqual((rc, out), (2, []))
        self.assertIn("needs a reason", err)

    def test_table_allowing_a_named_pair_is_refused(self):
        self.write("docs/ARCHITECTURE.md", TABLE.replace("| w | low |", "| w | low, decode |"))
        rc, _, err = self.run_check()
        self.assertEqual(rc, 2)
        self.assertIn("lets worker include decode, which issue 14 forbids", err)

    def test_table_naming_an_unknown_folder_is_refused(self):
        self.write("docs/ARCHITECTURE.md", TABLE.replace("| `low` |", "| `low`, ghost |"))
        rc, _, err = self.run_check()
        self.assertEqual(rc, 2)
        self.assertIn("'high' may include 'ghost', which has no row", err)

    def test_missing_table_is_refused(self):
        self.write("docs/ARCHITECTURE.md", "# no table here\n")
        rc, _, err = self.run_check()
        self.assertEqual(rc, 2)
        self.assertIn("expected exactly one table", err)

    def test_sources_outside_the_table_or_in_a_no_code_folder_fail(self):
        self.write("extra/x.cc", "int x;\n")
        self.write("data/y.h", "#pragma once\n")
        rc, out, _ = self.run_check()
        self.assertEqual(rc, 1)
        self.assertEqual(sorted(out), [
            "data/y.h: folder data is marked '—' (no C++/CUDA sources) in the folder table",
            "extra/x.cc: folder extra holds C++/CUDA sources but has no row in the folder table",
        ])

    def test_list_edges_counts_cross_folder_includes(self):
        self.write("tests/t.cc", '#include "high/top.h"\n#include "high/top.h"\n'
                                 '#include "low/base.h"\n')
        self.write("low/bad.cc", '#include "high/top.h"\n')
        rc, out, _ = self.run_check("--list-edges")
        self.assertEqual(rc, 0)
        edges = [line.split() for line in out[1:]]
        self.assertEqual(edges, [
            ["high", "->", "low", "1", "allowed"],
            ["low", "->", "high", "1", "FORBIDDEN"],
            ["tests", "->", "high", "2", "allowed"],
            ["tests", "->", "low", "1", "allowed"],
        ])


if __name__ == "__main__":
    unittest.main(verbosity=2)
