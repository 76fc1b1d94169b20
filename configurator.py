"""
One config dataclass per script, filled from a preset file and `--key=value` flags.

    cfg = parse_config(Config)                 # reads sys.argv[1:]
    python train_grpo.py config/tiny_cpu.py --lr=3e-4 --sp_size=2
    python train_grpo.py --help                # every field, its default and its meaning

A preset (config/*.py) is plain Python whose top-level assignments override fields; an assignment to a
name that is not a field is an error (typos must not be ignored silently), and so is a value of the wrong type
(`max_steps = "10"`; an int is accepted for a float). A bare `--flag` means true, for a bool field only (a bare
`--max_steps` is an error, not a 1-step run). The help text of a field is the trailing `# comment` on its line
in the dataclass, so the dataclass is the single place that documents it.
"""
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing


def field_comments(cls) -> dict:
    """{field name: trailing comment} read from the dataclass source and its dataclass bases' (the comment is
    the field's help)."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = inspect.getsource(klass)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        for i, tok in enumerate(tokens):
            if tok.type == tokenize.COMMENT and i > 0:
                line = source.splitlines()[tok.start[0] - 1].strip()
                name = line.split(":")[0].strip()
                if name.isidentifier() and ":" in line.split("#")[0]:
                    comments[name] = tok.string.lstrip("# ").strip()
    return comments


def optional(typ) -> bool:
    origin = typing.get_origin(typ)
    return origin is typing.Union or str(origin) == "<class 'types.UnionType'>"  # Optional[X] / X | None


def base_type(typ):
    """X for Optional[X] / X | None, else typ."""
    return next(a for a in typing.get_args(typ) if a is not type(None)) if optional(typ) else typ


def convert(value: str, typ, name: str):
    """Turn the text of a `--key=value` flag into the field's type; fail loudly on a mismatch."""
    if optional(typ):
        if value.lower() in ("none", "null", ""):
            return None
        typ = base_type(typ)
    origin = typing.get_origin(typ)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected true/false, got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"--{name}: expected {typ.__name__}, got {value!r}") from None
    if origin in (list, tuple, dict) or typ in (list, tuple, dict):  # JSON: --sizes=[64,256]
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--{name}: expected JSON, got {value!r}") from None
        return tuple(parsed) if (origin or typ) is tuple else parsed
    raise TypeError(f"--{name}: unsupported field type {typ}")


PRESET_TYPES = {bool: (bool,), int: (int,), float: (float, int), str: (str,), list: (list, tuple),
                tuple: (list, tuple), dict: (dict,)}  # the Python values a preset may give a field of each type


def check_value(value, typ, name: str, where: str, none_ok: bool = False):
    """A preset's value for a field, checked against the field's type (an int is a float too, a list or a tuple
    either of list / tuple, converted; None for an Optional field or, with none_ok, one whose default is None);
    fail naming the preset file and the field."""
    if value is None and (none_ok or optional(typ)):
        return None
    typ = base_type(typ)
    kind = typing.get_origin(typ) or typ
    allowed = PRESET_TYPES.get(kind)
    if allowed is None:  # a type this check does not know: taken as it is
        return value
    if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):  # True is an int too
        raise ValueError(f"{where}: field '{name}' = {value!r} ({type(value).__name__}), expected "
                         f"{getattr(typ, '__name__', str(typ))}")
    return kind(value) if kind in (float, list, tuple) else value


def print_help(cls):
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    print(doc + "\n\nfields (preset file: name = value; command line: --name=value):")
    comments, hints = field_comments(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
        print(f"  --{f.name}={default!r}  [{type_name}]  {comments.get(f.name, '')}")


def parse_config(cls, argv=None):
    """Defaults <- preset file(s) (positional *.py) <- --key=value flags, in that order."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        sys.exit(0)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    none_default = {f.name for f in dataclasses.fields(cls) if f.default is None}  # e.g. bench's `frames: list = None`
    values = {}
    for arg in argv:
        if not arg.startswith("--"):  # a preset: top-level assignments of plain Python
            with open(arg) as fh:
                source = fh.read()
            scope = {}
            exec(compile(source, arg, "exec"), {}, scope)
            assigned = {t.id for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                        if isinstance(t, ast.Name)}
            unknown = assigned - names
            if unknown:
                raise ValueError(f"{arg}: unknown config field(s) {sorted(unknown)}; see --help")
            values.update({k: check_value(scope[k], hints[k], k, arg, k in none_default) for k in assigned})
        else:
            key, eq, value = arg[2:].partition("=")
            if key not in names:
                raise ValueError(f"unknown flag --{key}; see --help for the fields of {cls.__name__}")
            if not eq and base_type(hints[key]) is not bool:
                raise ValueError(f"--{key}: a bare flag is only for true/false fields; give --{key}=VALUE")
            values[key] = convert(value, hints[key], key) if eq else True  # a bare --flag means true
    return cls(**values)


def print_config(cfg):
    """The config snapshot printed once at start-up (and saved beside the run)."""
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k} = {v!r}")
