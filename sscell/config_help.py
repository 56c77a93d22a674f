"""Every config field with its default and meaning, for `--help`: the meanings are the comments
beside the fields in `sscell.config.default_config`, read from its source, so that the help and
the code cannot drift apart."""
from __future__ import annotations

import ast
import inspect
import io
import itertools
import tokenize

from sscell import config as config_module
from sscell.config import default_config, flatten_config


def field_docs() -> dict[str, tuple[int, str]]:
    """{"train.lr": (source line, meaning), ...} in declaration order. A field's meaning is the
    comment ending its line (with the comment lines below that continue it, aligned with it), else
    the comment lines right above its line or above the uncommented lines before it; a field of a
    nested section (data.synthetic) without one gets the section's."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    comments = {token.start[0]: (token.start[1], token.string.lstrip("#").strip())
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}

    def alone(n: int) -> bool:
        return lines[n - 1].lstrip().startswith("#")

    def trailing(n: int) -> str:
        if n not in comments or alone(n):
            return ""
        column, parts = comments[n][0], [comments[n][1]]
        for m in itertools.count(n + 1):
            if not (m in comments and alone(m) and comments[m][0] == column):
                return " ".join(parts)
            parts.append(comments[m][1])

    def above(n: int) -> str:
        indent = len(lines[n - 1]) - len(lines[n - 1].lstrip())
        parts = []
        while n - 1 in comments and alone(n - 1) and comments[n - 1][0] == indent:
            parts.insert(0, comments[n - 1][1])
            n -= 1
        if not parts and n - 1 >= 1 and lines[n - 2].strip() and not trailing(n - 1) and not alone(n - 1):
            return above(n - 1)  # a block of uncommented lines shares the comment above its first
        return " ".join(parts)

    docs = {}

    def visit(name: str, value: ast.AST, node: ast.AST, inherited: str) -> None:
        own = trailing(node.end_lineno) or above(node.lineno) or inherited
        fields = value.args[0] if isinstance(value, ast.Call) and value.args else None
        if isinstance(fields, ast.Call) and getattr(fields.func, "id", "") == "dict":  # ConfigDict(dict(...))
            for keyword in fields.keywords:
                visit(f"{name}.{keyword.arg}", keyword.value, keyword, own if "." in name else "")
        else:
            docs[name] = (node.lineno, own)

    function = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
                    and n.name == "default_config")
    for statement in function.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Attribute):
            visit(statement.targets[0].attr, statement.value, statement, "")
    return docs


def config_help() -> str:
    """The default config: `field=default, ...: meaning` per source line of `default_config`."""
    values = flatten_config(default_config().to_dict())
    out = []
    for (_, doc), fields in itertools.groupby(field_docs().items(), key=lambda item: item[1]):
        shown = (f"{name}={tuple(values[name]) if isinstance(values[name], list) else values[name]!r}"
                 for name, _ in fields)  # lists: the config's tuples, flattened
        out.append("- " + ", ".join(shown) + (f": {doc}" if doc else ""))
    return "\n".join(out)
