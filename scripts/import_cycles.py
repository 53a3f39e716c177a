#!/usr/bin/env python3
"""The layering check of docs/design.md, read from the `use` lines of src/.

Every `crate::`/`super::` path in a file (in `use` statements and inline in code) is resolved to
the file that defines the named item, following `pub use` re-exports to the item's own file, so a
`mod.rs` that only re-exports its children is not a hub (its `pub use child::X` lines are not
edges; every other `use`, `pub use crate::...` included, is). It prints, and exits 1 for:

- each import circle among files (a strongly connected component of the file graph, with the
  lines that close it);
- each import from `commands/` by a file outside `commands/`, `main.rs` and `lib.rs` (commands
  only parse and report; nothing below them may reach up into them).

Standard library only; run by `make test` (so CI runs it).
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_path(rel):
    """src-relative file -> module segments below the crate root."""
    parts = rel[:-3].split("/")
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text):
    """Blanks comments and string literals, keeping line numbers (and offsets) unchanged."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"' or (c == "r" and re.match(r'r#*"', text[i:i + 8]) and not re.match(r"\w", text[i - 1:i] or " ")):
            if c == "r":
                m = re.match(r'r(#*)"', text[i:])
                close = '"' + m.group(1)
                j = text.find(close, i + len(m.group(0)))
                j = n if j < 0 else j + len(close)
            else:
                j = i + 1
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
                j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e as f}, self}` -> [[a, b], [a, c, d], [a, c, e], [a]]."""
    tree = re.sub(r"\s+as\s+" + IDENT, "", tree)  # an alias changes the name, not the file
    tree = re.sub(r"\s+", "", tree)

    def split_top(s):
        depth, cur, parts = 0, "", []
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    def go(prefix, s):
        i = s.find("{")
        if i < 0:
            segs = [x for x in s.split("::") if x]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            return [prefix + segs]
        head = [x for x in s[:i].split("::") if x]
        inner = s[i + 1:s.rfind("}")]
        res = []
        for part in split_top(inner):
            res.extend(go(prefix + head, part))
        return res

    return go([], tree)


class Crate:
    def __init__(self, root):
        self.root = root
        self.files = {}  # module path -> rel file
        for d, _, names in os.walk(root):
            for name in names:
                if name.endswith(".rs"):
                    rel = os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")
                    if rel == "main.rs":
                        continue
                    self.files[module_path(rel)] = rel
        self.text = {}
        self.reexports = {}  # rel -> {name: absolute segments}
        for mod, rel in self.files.items():
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                self.text[rel] = strip_comments(f.read())
        for mod, rel in self.files.items():
            self.reexports[rel] = {}
            for m in re.finditer(r"\bpub\s+use\s+([^;]+);", self.text[rel]):
                for segs in expand_use(m.group(1)):
                    absolute = self.absolute(mod, segs, rel, m.start())
                    if absolute:
                        self.reexports[rel][segs[-1]] = absolute

    def inline_module_depth(self, rel, pos):
        """How many inline `mod x {` blocks enclose offset pos (tests modules, mostly)."""
        text = self.text[rel]
        depth = 0
        for m in re.finditer(r"\bmod\s+" + IDENT + r"\s*\{", text[:pos]):
            # the block is open at pos if its braces are not balanced before pos
            level, j = 0, m.end() - 1
            while j < pos:
                if text[j] == "{":
                    level += 1
                elif text[j] == "}":
                    level -= 1
                    if level == 0:
                        break
                j += 1
            if j >= pos:
                depth += 1
        return depth

    def absolute(self, mod, segs, rel, pos):
        """A path as written in file rel (module mod) -> segments from the crate root, or None
        for paths outside the crate (std, other crates)."""
        if not segs:
            return None
        if segs[0] == "crate":
            return list(segs[1:])
        if segs[0] in ("super", "self"):
            base = list(mod)
            inline = self.inline_module_depth(rel, pos)
            rest = list(segs)
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    if inline:
                        inline -= 1
                    else:
                        base = base[:-1]
                rest = rest[1:]
            if inline:  # a path into an inline module of this file stays in this file
                return list(mod)
            return base + rest
        # a bare path in a `use` names a child module of this one (2018 edition uniform paths)
        if tuple(list(mod) + [segs[0]]) in self.files:
            return list(mod) + list(segs)
        return None

    def resolve(self, segs, seen=None):
        """Segments from the crate root -> the rel file defining the item they name."""
        seen = seen or set()
        cur = ()
        for i, s in enumerate(segs):
            nxt = cur + (s,)
            if nxt in self.files:
                cur = nxt
                continue
            rel = self.files.get(cur)
            if rel is None:
                return None
            target = self.reexports.get(rel, {}).get(s)
            key = (rel, s)
            if target is not None and key not in seen:
                seen.add(key)
                return self.resolve(target + list(segs[i + 1:]), seen)
            return rel
        return self.files.get(cur)

    def edges(self):
        """(from rel, to rel) -> first line number that makes the edge."""
        out = {}
        for mod, rel in self.files.items():
            text = self.text[rel]
            spans = []
            for m in re.finditer(r"(?<![\w:])use\s+([^;]+);", text):
                spans.append((m.start(), m.end()))
                facade = re.search(r"\bpub\s+$", text[max(0, m.start() - 8):m.start()])
                for segs in expand_use(m.group(1)):
                    if facade and segs and (segs[0] == "self" or tuple(mod) + (segs[0],) in self.files):
                        continue  # a module re-exporting its own children is their facade, not a user
                    self.add(out, mod, rel, segs, m.start())
            for m in re.finditer(r"(?<![\w:])((?:crate|super)(?:::" + IDENT + r")+)", text):
                if any(a <= m.start() < b for a, b in spans):
                    continue
                self.add(out, mod, rel, m.group(1).split("::"), m.start())
        return out

    def add(self, out, mod, rel, segs, pos):
        absolute = self.absolute(mod, segs, rel, pos)
        if absolute is None:
            return
        target = self.resolve(absolute)
        if target is None or target == rel:
            return
        line = self.text[rel].count("\n", 0, pos) + 1
        key = (rel, target)
        if key not in out or line < out[key]:
            out[key] = line


def cycles(nodes, edges):
    """Tarjan's strongly connected components with more than one file."""
    graph = {n: sorted(b for (a, b) in edges if a == n) for n in nodes}
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return comps


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else ROOT
    crate = Crate(root)
    edges = crate.edges()
    bad = 0
    for comp in cycles(set(crate.files.values()), edges):
        bad += 1
        print(f"import circle among {len(comp)} files:")
        members = set(comp)
        for (a, b), line in sorted(edges.items()):
            if a in members and b in members:
                print(f"  src/{a}:{line} uses src/{b}")
    upward = [
        (a, b, line)
        for (a, b), line in sorted(edges.items())
        if b.startswith("commands/") and not a.startswith("commands/") and a not in ("lib.rs",)
    ]
    for a, b, line in upward:
        bad += 1
        print(f"src/{a}:{line} imports src/{b} (commands/ only parse and report; move it below)")
    if bad:
        print(f"import check: {bad} problem(s) in {len(crate.files)} files")
        return 1
    print(f"import check: no circle, no import from commands/ ({len(crate.files)} files, {len(edges)} imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
