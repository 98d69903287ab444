#!/usr/bin/env python3
"""Fails when the files of a crate import one another in a circle.

For every crate under the given directory (default `crates`), each top-level module (a file,
or a directory with its children counted as one) depends on the modules it names through
`use crate::…` or a `crate::…` path outside comments and `#[cfg(test)]` code. Prints the graph
of every crate with a cycle and the cycles, and exits 1 if there is one; docs/architecture.md
states the rule.
"""
import glob
import os
import re
import sys


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3]
    if rel in ("lib", "main"):
        return rel
    return rel.split("/")[0]


def graph_of(root):
    files = glob.glob(os.path.join(root, "**", "*.rs"), recursive=True)
    modules = {module_of(root, f) for f in files}
    graph = {}
    for f in files:
        module = module_of(root, f)
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        text = re.sub(r"//[^\n]*", "", text).split("#[cfg(test)]")[0]
        deps = set()
        for m in re.finditer(r"use crate::(\{[^;]*\}|[^;]*);", text, re.S):
            body = m.group(1)
            names = re.findall(r"[{,]\s*([a-z_0-9]+)", body) if body.startswith("{") else []
            first = re.match(r"\{?\s*([a-z_0-9]+)", body)
            if first:
                names.append(first.group(1))
            deps.update(n for n in names if n in modules)
        deps.update(n for n in re.findall(r"crate::([a-z_0-9]+)", text) if n in modules)
        deps.discard(module)
        graph.setdefault(module, set()).update(deps)
    return graph


def cycles_of(graph):
    found = set()

    def walk(node, stack):
        for dep in sorted(graph.get(node, ())):
            if dep in stack:
                found.add(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif len(stack) < 16:
                walk(dep, stack + [dep])

    for node in sorted(graph):
        walk(node, [node])
    return sorted(found)


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "crates"
    failed = False
    for src in sorted(glob.glob(os.path.join(base, "*", "src"))):
        crate = os.path.basename(os.path.dirname(src))
        graph = graph_of(src)
        cycles = cycles_of(graph)
        if cycles:
            failed = True
            print(f"{crate}: files import one another in a circle:")
            for c in cycles[:20]:
                print(f"  {c}")
            for module in sorted(graph):
                print(f"  {module} -> {', '.join(sorted(graph[module])) or '(none)'}")
        else:
            print(f"{crate}: {len(graph)} modules, no import cycle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
