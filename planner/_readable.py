"""Argument layouts as a person reads them: repeated layers and mirrored optimizer state
folded into one line each.

A 24-layer model has thousands of arguments; listing each one buries the plan. Two facts
make the list short without hiding anything: layers of one kind usually take one layout
(`['blocks'][*]`), and optimizer state usually takes its parameter's layout. Whatever
breaks either pattern is still listed on its own line.
"""
from __future__ import annotations

import re

from meshplan.ir._graph import split_path

# An integer subscript right after a string subscript: a layer index (`['blocks'][3]`),
# not a tuple position such as an optax state's `[0]`.
_LAYER_INDEX = re.compile(r"(?<='\])\[(\d+)\]")


def layout_lines(paths: tuple[str, ...], specs: tuple[str, ...]) -> list[str]:
    """One line per argument layout, in argument order, repeated layers and mirrored
    optimizer state folded.

    >>> layout_lines(("[0]['b'][0]['w']", "[0]['b'][1]['w']", "[0]['e']",
    ...               "[1].mu['b'][0]['w']", "[1].mu['b'][1]['w']", "[1].mu['e']"),
    ...              ("P('tp',)",) * 2 + ("P()", "P('tp',)", "P('tp',)", "P('dp',)"))
    ["[0]['b'][*]['w']: P('tp',)", "[0]['e']: P()", '[1].mu: each other array as its parameter (2 arrays)', "[1].mu['e']: P('dp',)"]
    """
    spec_of = dict(zip(paths, specs))
    container_of, exceptions = _mirrors(paths, spec_of)
    # Each line's key (a container or a layer pattern) in the order of its first array.
    members: dict[tuple[str, str], list[str]] = {}
    layers_of: dict[str, int] = {}  # layer pattern -> how many arrays have it, in all
    for p in paths:
        pattern = _LAYER_INDEX.sub("[*]", p)
        layers_of[pattern] = layers_of.get(pattern, 0) + 1
        c = container_of.get(p)
        members.setdefault(("state", c) if c is not None else ("layers", pattern),
                           []).append(p)
    lines = []
    for (kind, key), group in members.items():
        if kind == "state":
            other = "other " if key in exceptions else ""
            n = len(group)
            lines.append(f"{key}: each {other}array as its parameter "
                         f"({n} array{'s' if n > 1 else ''})")
        elif len(group) == layers_of[key] > 1 and len({spec_of[p] for p in group}) == 1:
            lines.append(f"{key}: {spec_of[group[0]]}")
        else:  # one array, or not every layer alike: each on its own line
            lines += [f"{p}: {spec_of[p]}" for p in group]
    return lines


def _mirrors(paths, spec_of) -> tuple[dict[str, str], set[str]]:
    """(path -> its container (e.g. `[1][0].mu`) for each array laid out as the parameter
    whose path it ends with, containers holding an array laid out otherwise).

    A parameter's path is that of an earlier argument, the argument position stripped:
    parameters come before their optimizer state.
    """
    by_rest: dict[str, tuple[int, str]] = {}
    for p in paths:
        arg, rest = split_path(p)
        by_rest.setdefault(rest, (arg, p))
    found: dict[str, str] = {}
    exceptions: set[str] = set()
    for p in paths:
        arg, rest = split_path(p)
        for i in range(1, len(rest)):
            if rest[i] != "[":
                continue
            twin_arg, twin = by_rest.get(rest[i:], (arg, ""))
            if twin_arg >= arg:
                continue
            container = p[:len(p) - len(rest) + i]
            if spec_of[twin] == spec_of[p]:
                found[p] = container
            else:
                exceptions.add(container)
            break
    return found, exceptions
