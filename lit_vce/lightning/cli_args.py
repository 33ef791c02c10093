"""``lit-vce predict``'s command line before LightningCLI parses it, and its one-line
errors: every ``--config`` applied first (:func:`configs_first`), registered method names
and shipped config names resolved (:func:`resolve_method_names`), a parse error as one
line with the closest setting (:func:`parse_error_line`), the run folder named by the run
(:func:`default_output_dir`) and the deferred method built from its parsed config."""

from __future__ import annotations

import sys

#: LightningCLI's parser, told to raise instead of printing its usage and exiting (the
#: error becomes one line: :func:`parse_error_line`)
PARSER_KWARGS = {"exit_on_error": False, "predict": {"exit_on_error": False}}


def _parser_keys(parser) -> list[str]:
    """Every dotted setting the (sub)command parser takes."""
    action = getattr(parser, "_subcommands_action", None)
    if action is not None and "predict" in action._name_parser_map:
        parser = action._name_parser_map["predict"]
    try:
        return [str(k) for k in parser.get_defaults().keys()]
    except Exception:  # suggestions are a courtesy; the error is still one line
        return []


def _method_keys(class_path: str) -> list[str]:
    """The settings of a method class (DiG-IN's groups dotted: ``optimisation.outer_steps``)."""
    from jsonargparse import ArgumentParser

    cls = _method_class(class_path)
    if cls is None:
        return []
    p = ArgumentParser(exit_on_error=False)
    p.add_class_arguments(cls, "m", fail_untyped=False)
    return [str(k)[2:] for k in p.get_defaults().keys()]


def parse_error_line(message: str, parser=None) -> str:
    """One line for a parse error: the unknown setting with the closest known ones, or
    the parser's first informative line."""
    import re

    from ..errors import suggest

    m = re.search(r"class_path '([\w.]+)'", message)
    bad = re.search(r"Option '([\w.]+)' is not accepted", message) or re.search(
        r"Group '([\w.]+)' does not accept option '([\w.]+)'", message
    )
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if m and (bad or unrecognized):
        if bad and bad.lastindex == 2:
            name = f"{bad.group(1)}.{bad.group(2)}"
        elif bad:
            name = bad.group(1)
        else:
            name = unrecognized.group(1).split()[0].lstrip("-").split("=")[0]
        cls = m.group(1).rsplit(".", 1)[-1]
        registered = _registered_by_class_name(cls) or cls
        return (
            f"--model.method.init_args.{name}: {cls} has no setting {name!r}"
            f"{suggest(name, _method_keys(m.group(1)), n=1)} "
            f"(`lit-vce predict --model.method.help {registered}` lists them)"
        )
    option = re.search(r"does not accept option '([\w.]+)'", message)
    names = [option.group(1)] if option else []
    if unrecognized and not names:
        names = [t.lstrip("-").split("=")[0] for t in unrecognized.group(1).split() if t.startswith("--")]
    if names:
        keys = _parser_keys(parser) if parser is not None else []
        parts = [f"--{n}: no such setting{suggest('--' + n, ['--' + k for k in keys], n=1)}" for n in names]
        return "; ".join(parts) + " (`lit-vce predict --help` lists them)"
    # a bad value: the setting's full name and the reason, without the union's boilerplate
    skip = ("Does not validate against any", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines() if ln.strip()]
    reasons = [ln for ln in lines if not ln.startswith((*skip, "Parser key", "Problem with given class_path"))]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if keys and reasons:
        flag = ".".join(keys)
        if m and keys[0] == "model.method" and len(keys) > 1:
            flag = "model.method.init_args." + ".".join(keys[1:])
        return f"--{flag}: {reasons[0]}"
    return " ".join([ln for ln in lines if not ln.startswith(skip)][:3])


_FOLDER_FIELDS = ("method", "classifier", "protocol", "dataset")
AUTO_OUTPUT_DIR = "runs/{dataset}/{method}-{classifier}-{protocol}"


def default_output_dir(cfg) -> str:
    """The run folder of a parsed predict config: ``writer.output_dir`` as given, with
    ``auto`` meaning ``runs/{dataset}/{method}-{classifier}-{protocol}`` (an analysis:
    ``runs/analyses/{method}-{classifier}``); the fields
    ``{method}`` (the registered method name, or the analysis: ``disagree``),
    ``{classifier}``, ``{protocol}`` and ``{dataset}`` are filled in (characters other
    than letters, digits and ``._+-`` become ``_``: ``robustbench_Salman2020Do_R50``)."""
    import re

    model, data = cfg["model"], cfg["data"]
    out = str(cfg["writer"]["output_dir"])
    if out == "auto":  # an analysis (disagree, neurons) has no protocol: runs/analyses/disagree-biased
        out = "runs/analyses/{method}-{classifier}" if model.get("analysis") else AUTO_OUTPUT_DIR
    if "{" not in out:
        return out
    method = model.get("analysis")
    if not method:
        m = model.get("method")
        path = (m.get("class_path") if hasattr(m, "get") else None) or ""
        cls = path.rsplit(".", 1)[-1]
        method = (_registered_by_class_name(cls) or cls.lower()) if cls else "classifier_guidance"
    values = {
        "method": method,
        "classifier": model.get("classifier"),
        "protocol": data.get("protocol"),
        "dataset": data.get("dataset"),
    }
    clean = {
        k: re.sub(r"[^A-Za-z0-9._+-]+", "_", str(v if v not in (None, "") else "none")).strip("_")[:80]
        for k, v in values.items()
    }
    try:
        return out.format(**clean)
    except (KeyError, IndexError, ValueError) as e:
        from ..errors import ConfigError

        fields = ", ".join("{" + f + "}" for f in _FOLDER_FIELDS)
        raise ConfigError(f"--writer.output_dir {out!r}: unknown field {e}; the fields are {fields}") from None


def _instantiate_method(config, module_class):
    """The method of a parsed ``model.method`` config (class_path and init_args), built."""
    import typing

    from jsonargparse import ArgumentParser, Namespace

    from ..errors import ConfigError

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=typing.get_type_hints(module_class.__init__)["method"])  # as the CLI parsed it
    try:
        return parser.instantiate(Namespace(method=config)).method
    except (ValueError, FileNotFoundError) as e:
        cause = _litvce_cause(e)
        if cause is not None:  # the package's own error (missing weights, ...) as it was raised
            raise cause from None
        raise ConfigError(f"--model.method: {e}") from e


def _litvce_cause(e: BaseException):
    """The package's error (:class:`~lit_vce.errors.LitVCEError`) that jsonargparse wrapped, if any."""
    from ..errors import LitVCEError

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, LitVCEError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _class_path(name: str) -> str | None:
    """The class path of a registered method name (``None`` when ``name`` is not one)."""
    from ..registry import METHODS

    if not isinstance(name, str) or "." in name or name not in METHODS:
        return None
    cls = METHODS.get(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def _method_class(name):
    """The method class of a registered name or a class path (``None`` when it names none)."""
    import importlib

    from ..registry import METHODS

    if not isinstance(name, str) or not name:
        return None
    if "." not in name:
        return METHODS.get(name) if name in METHODS else None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def _nest_aliases(cls, init_args: dict) -> tuple[dict, list[str]]:
    """``init_args`` with a method's deprecated flat names moved into their groups
    (``cls.setting_aliases``: flat name -> ``group.field``), and the names moved."""
    aliases = getattr(cls, "setting_aliases", None) or {}
    retired = getattr(cls, "retired_settings", None) or {}
    out, moved = dict(init_args), []
    for key in [k for k in out if k in retired and out[k] == retired[k]]:  # the one value that remains: nothing to set
        out.pop(key)
    for key in [k for k in out if k in aliases]:
        if isinstance(out[key], dict):  # a group of the same name (DiG-IN's inversion), not the flat value
            continue
        group, field = aliases[key].split(".")
        value = out.pop(key)  # first: the flat name may be the group's own (DiG-IN's inversion)
        block = dict(out.get(group) or {})
        block[field] = value
        out[group] = block
        moved.append(key)
    return out, moved


def _warn_moved(cls, moved: list[str], where: str) -> None:
    if moved:
        import warnings

        aliases = cls.setting_aliases
        warnings.warn(
            f"{where}: {cls.__name__}'s flat setting(s) {', '.join(moved)} are deprecated; use "
            + ", ".join(aliases[k] for k in moved),
            DeprecationWarning,
            stacklevel=3,
        )
        print(
            f"note: {where}: deprecated flat names {', '.join(moved)} read as " + ", ".join(aliases[k] for k in moved),
            file=sys.stderr,
        )


def _resolve_config_file(path: str) -> str:
    """A YAML config whose ``model.method`` is a registered name (``method: dvce``) or has
    one as ``class_path``, or uses a method's deprecated flat setting names, becomes a
    resolved copy (a temporary file); others stay as they are."""
    import atexit
    import os
    import tempfile
    from pathlib import Path

    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # jsonargparse reports unreadable configs itself
    model = cfg.get("model") if isinstance(cfg, dict) else None
    method = model.get("method") if isinstance(model, dict) else None
    changed = False
    if isinstance(method, str) and _class_path(method):
        model["method"] = {"class_path": _class_path(method)}
        changed = True
    elif isinstance(method, dict) and _class_path(method.get("class_path")):
        method["class_path"] = _class_path(method["class_path"])
        changed = True
    method = model.get("method") if isinstance(model, dict) else None
    if isinstance(method, dict) and isinstance(method.get("init_args"), dict):
        cls = _method_class(method.get("class_path"))
        method["init_args"], moved = _nest_aliases(cls, method["init_args"])
        _warn_moved(cls, moved, path)
        changed = changed or bool(moved)
    if not changed:
        return path
    fd, out = tempfile.mkstemp(prefix=f"{Path(path).stem}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    atexit.register(lambda p=out: os.path.exists(p) and os.remove(p))
    return out


def _config_method(path: str):
    """The method class a (resolved) YAML config names, or ``None``."""
    from pathlib import Path

    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    method = ((cfg or {}).get("model") or {}).get("method") if isinstance(cfg, dict) else None
    return _method_class(method.get("class_path")) if isinstance(method, dict) else None


def _registered_by_class_name(name: str) -> str | None:
    """The registered name of the method class called ``name`` (``DVCE`` -> ``dvce``), if any."""
    from ..registry import METHODS

    return next((n for n in METHODS.names() if METHODS.get(n).__name__ == name), None)


def configs_first(argv: list[str]) -> list[str]:
    """``--config`` files move before every other argument, keeping their order, so a
    setting given on the command line wins over every config file wherever it stands
    (``--data.num_workers 7 --config imagenet/base`` keeps 7; jsonargparse alone would
    let the later file reset it). Between files, the later one wins."""
    configs: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            configs += argv[i : i + 2]
            i += 2
            continue
        (configs if a.startswith("--config=") else rest).append(a)
        i += 1
    return configs + rest


def resolve_method_names(argv: list[str]) -> list[str]:
    """Registered method names become class paths, so jsonargparse can build the method
    and its arguments follow as ``--model.method.init_args.<arg>`` (or ``--model.method.<arg>``):
    on the command line ``--model.method NAME`` (or ``=NAME``, or ``--model.method.class_path
    NAME``, and ``--model.method.help NAME`` for a method's arguments), and in YAML files
    given with ``--config`` ``method: NAME`` or ``class_path: NAME``.
    A method's deprecated flat setting names (DiG-IN's ``outer_steps``, ...) are moved into
    their groups, in files and on the command line, with a note."""
    keys = ("--model.method", "--model.method.class_path", "--model.method.help")
    out = list(argv)
    cls = None
    for i, a in enumerate(out):
        key, eq, value = a.partition("=")
        j = i if eq else i + 1
        value = value if eq else (out[j] if j < len(out) else "")
        if key == "--model.method.help" and value and not _class_path(value):
            value = _registered_by_class_name(value) or value  # a class name (DVCE), as jsonargparse takes it
        if key == "--config" and value:
            from ..config_files import find_config

            new = _resolve_config_file(str(find_config(value)))
            cls = _config_method(new) or cls
        elif key in keys and _class_path(value):
            new = _class_path(value)
            cls = _method_class(value)
        elif key in keys and value and "." not in value:  # neither registered nor a class path
            from ..errors import UnknownNameError, suggest
            from ..registry import METHODS

            raise UnknownNameError(
                f"{key} {value}: no such method{suggest(value, METHODS.names())} "
                f"(`lit-vce methods` lists {', '.join(METHODS.names())})"
            )
        else:
            if key in keys:
                cls = _method_class(value) or cls
            for prefix in ("--model.method.init_args.", "--model.method."):
                name = key[len(prefix) :] if key.startswith(prefix) else None
                if (
                    name
                    and cls is not None
                    and name in (getattr(cls, "setting_aliases", None) or {})
                    and not value.lstrip().startswith("{")
                ):
                    target = cls.setting_aliases[name]
                    _warn_moved(cls, [name], "command line")
                    out[i] = f"--model.method.init_args.{target}" + (f"={value}" if eq else "")
                    break
            continue
        if eq:
            out[i] = f"{key}={new}"
        else:
            out[j] = new
    return out
