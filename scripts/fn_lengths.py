#!/usr/bin/env python3
"""No function in src/ longer than LIMIT lines (its signature line to its closing brace).

A long function is several concepts in one scope; split it along them. Bodies are found by
matching braces after each `fn` in the source with comments, strings and character literals
blanked (`import_cycles.strip_comments`), so a `{` in a string or a doc comment does not count.
Nested functions are measured on their own and inside their parent. Prints each offender with its
length and exits 1 if there is one. Standard library only; run by `make test` (so CI runs it).
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_cycles import ROOT, strip_comments  # noqa: E402

LIMIT = 120
FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(text):
    """(name, first line, last line) of every fn with a body in `text` (already stripped)."""
    out = []
    for m in FN.finditer(text):
        i, depth = m.end(), 0
        # the signature ends at the body's `{`, or at `;` for a declaration without a body
        while i < len(text):
            c = text[i]
            if c in "(<[":
                depth += 1
            elif c in ")>]" and not (c == ">" and text[i - 1] == "-"):
                depth -= 1
            elif c == ";" and depth <= 0:
                break
            elif c == "{" and depth <= 0:
                break
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        open_at, level = i, 0
        while i < len(text):
            if text[i] == "{":
                level += 1
            elif text[i] == "}":
                level -= 1
                if level == 0:
                    break
            i += 1
        first = text.count("\n", 0, m.start()) + 1
        out.append((m.group(1), first, text.count("\n", 0, i) + 1))
    return out


def main():
    offenders, count = [], 0
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, os.path.join(ROOT, ".."))
            with open(path, encoding="utf-8") as fh:
                text = strip_comments(fh.read())
            for name, first, last in functions(text):
                count += 1
                if last - first + 1 > LIMIT:
                    offenders.append((last - first + 1, f"{rel}:{first} fn {name}"))
    for n, where in sorted(offenders, reverse=True):
        print(f"{where}: {n} lines (limit {LIMIT})")
    print(f"function length check: {len(offenders)} of {count} functions in src/ over {LIMIT} lines")
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
