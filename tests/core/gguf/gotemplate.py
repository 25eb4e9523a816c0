"""A small renderer for the subset of Go's text/template that cnllm's Ollama templates use.

Actions ``{{ … }}`` with ``{{-``/``-}}`` whitespace trimming; ``range $i, $_ := .Messages`` … ``end``;
``if`` / ``else if`` / ``else`` / ``end``; pipelines of ``.Field``, ``$var``, ``$.Field``, string and
integer literals and the functions ``eq``, ``ne``, ``gt``, ``lt``, ``and``, ``or``, ``not``. Anything
else raises, so a template that leaves the subset fails its test rather than rendering wrongly.
"""

from __future__ import annotations

import re
import shlex

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "lt": lambda a, b: a < b,
    "and": lambda a, b: a and b,
    "or": lambda a, b: a or b,
    "not": lambda a: not a,
}


def tokens(source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    trim_next = False
    for match in ACTION.finditer(source):
        text = source[position:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = source[position:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def parse(items: list[tuple[str, str]], start: int = 0, stop_words: tuple[str, ...] = ()) -> tuple[list, int, str | None]:
    nodes: list = []
    index = start
    while index < len(items):
        kind, value = items[index]
        index += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(" ", 1)[0]
        if word in stop_words or value.startswith("else"):
            return nodes, index, value
        if word == "if":
            branches = []
            condition = value[3:]
            while True:
                body, index, ender = parse(items, index, ("end",))
                branches.append((condition, body))
                if ender == "end":
                    break
                condition = ender[len("else if "):] if ender.startswith("else if ") else None
                if ender != "else" and not ender.startswith("else if "):
                    raise ValueError(f"unsupported action {ender!r}")
            nodes.append(("if", branches))
        elif word == "range":
            match = re.fullmatch(r"range (?:(\$\w+), (\$\w+) := )?(\S+)", value)
            if not match:
                raise ValueError(f"unsupported range {value!r}")
            body, index, ender = parse(items, index, ("end",))
            if ender != "end":
                raise ValueError("range with else is not supported")
            nodes.append(("range", match.group(1), match.group(2), match.group(3), body))
        else:
            nodes.append(("print", value))
    return nodes, index, None


def evaluate(expression: str, dot, variables: dict):
    words = shlex.split(expression.replace("(", " ( ").replace(")", " ) "), posix=False)

    def value(word: str):
        if word.startswith('"'):
            return word[1:-1]
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word.startswith("$."):
            return variables["$"][word[2:]]
        if word.startswith("$"):
            return variables[word]
        if word.startswith("."):
            return dot[word[1:]]
        raise ValueError(f"unsupported operand {word!r}")

    if words[0] in FUNCTIONS:
        return FUNCTIONS[words[0]](*(value(w) for w in words[1:]))
    if len(words) != 1:
        raise ValueError(f"unsupported pipeline {expression!r}")
    return value(words[0])


def execute(nodes: list, dot, variables: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(evaluate(node[1], dot, variables)))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or evaluate(condition, dot, variables):
                    out.append(execute(body, dot, variables))
                    break
        elif node[0] == "range":
            _, index_var, item_var, source, body = node
            for number, item in enumerate(evaluate(source, dot, variables)):
                scope = dict(variables)
                if index_var:
                    scope[index_var], scope[item_var] = number, item
                out.append(execute(body, item, scope))
    return "".join(out)


def render(source: str, data: dict) -> str:
    nodes, _, leftover = parse(tokens(source))
    if leftover is not None:
        raise ValueError(f"unbalanced {leftover!r}")
    return execute(nodes, data, {"$": data})
