"""A user's own config folder (``--config-dir DIR``): read safely, searched before the shipped presets, and named
in the output.

Its YAML files are read once as a stream of events (no value is built) before Hydra composes them: anchors and
aliases are refused (a few hundred bytes of nested aliases expand without bound, and Hydra would hang building
them), as are tags other than YAML's plain types (``!!python/...``), and a syntax error becomes one line naming
the file and the line. A file there with a shipped preset's name (``DIR/model/t5_tiny.yaml``) wins over the
shipped one, as copying a preset and editing it is the natural way to customize it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import yaml
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from fsdp_kit.errors import ConfigError

SHIPPED = "fsdp_kit.configs"
"""The shipped configs' package (Hydra's pkg://fsdp_kit.configs)."""

_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}
SEARCHPATH_KEY = "hydra.searchpath"


def check_yaml(path: Path) -> None:
    """Refuse ``path`` with one line (file and line) if it is not plain YAML: a syntax error, an anchor or alias,
    a tag other than the plain types, or bytes that are not UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})", "save it as UTF-8"
        ) from err
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", "check the file and its permissions") from err
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(
                    f"{path} line {line}: YAML anchors and aliases (&name, *name) are not accepted in "
                    "config files (nested ones expand without bound)",
                    "write the values out, or refer to another key with ${key}",
                )
            tag = getattr(event, "tag", None)
            if tag and tag not in _PLAIN_TAGS:
                raise ConfigError(
                    f"{path} line {line}: the YAML tag {tag} is not accepted in config files",
                    "write a plain value (string, number, true/false, null, list or mapping)",
                )
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{where} is not valid YAML: {err.problem or err.context}",
            "correct the YAML there (indentation, quotes, ':' after each key)",
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}", "correct the YAML there") from err


def checked_folder(config_dir: str) -> Path:
    """``--config-dir``'s folder as an absolute path, refused with one line if it is no folder or holds a file
    that is not plain YAML."""
    folder = Path(config_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--config-dir {config_dir} is not a folder", "pass a folder holding e.g. cluster/mine.yaml")
    check_folder(folder)
    return folder


def check_folder(folder: Path) -> None:
    """Every YAML file under a config folder, before Hydra reads any of them."""
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        if path.is_file():
            check_yaml(path)


def user_folders(overrides: Iterable[str]) -> list[Path]:
    """The folders that ``hydra.searchpath=[file://DIR, ...]`` overrides name (what ``--config-dir`` becomes)."""
    folders = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == SEARCHPATH_KEY:
            for entry in value.strip().strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    folders.append(Path(entry[len("file://") :]))
    return folders


def folder_first(argv: list[str]) -> tuple[list[str], str | None]:
    """A Hydra app's arguments without the user's config folder, and that folder (checked, absolute) or None.

    Hydra searches ``--config-dir DIR`` and ``hydra.searchpath=[file://DIR]`` after the app's own configs, so a
    shipped preset would win over the user's file of the same name; ``search_first`` puts DIR before them."""
    rest, folders, at = [], [], 0
    while at < len(argv):
        item = argv[at]
        if item in ("--config-dir", "-cd") and at + 1 < len(argv):
            folders.append(Path(argv[at + 1]))
            at += 2
            continue
        if item.startswith("--config-dir="):
            folders.append(Path(item.partition("=")[2]))
        elif item.partition("=")[0].strip() == SEARCHPATH_KEY and user_folders([item]):
            folders.extend(user_folders([item]))
        else:
            rest.append(item)
        at += 1
    if not folders:
        return argv, None
    if len(folders) > 1:
        raise ConfigError(
            f"{len(folders)} config folders given ({', '.join(map(str, folders))})", "pass one --config-dir"
        )
    return rest, str(checked_folder(str(folders[0])))


class _FolderFirst(SearchPathPlugin):
    """Hydra's own way to change its search path: a plugin that puts the user's folder before the app's configs."""

    folder: str | None = None

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if self.folder:
            search_path.prepend("fsdp_kit --config-dir", f"file://{self.folder}", anchor="main")


def search_first(folder: str | None) -> None:
    """Hydra apps started later in this process search ``folder`` before their own configs (None: no folder)."""
    _FolderFirst.folder = folder
    plugins = Plugins.instance()
    if folder and _FolderFirst not in plugins.discover(SearchPathPlugin):
        plugins.register(_FolderFirst)


def origins(choices: Mapping[str, str | None], search_path: Iterable[str]) -> dict[str, str]:
    """``group=option`` -> the file it was read from: the first of ``search_path`` (``file://DIR`` and
    ``pkg://PACKAGE`` entries, in Hydra's order) that holds ``group/option.yaml``; Hydra's own groups are left
    out, the shipped presets are called "shipped"."""
    found = {}
    for group, option in choices.items():
        if option is None or group.startswith("hydra") or group == "train_schema":
            continue
        for entry in search_path:
            scheme, _, where = entry.partition("://")
            if scheme == "file" and (Path(where) / group / f"{option}.yaml").is_file():
                found[f"{group}={option}"] = str(Path(where) / group / f"{option}.yaml")
                break
            if (
                scheme == "pkg"
                and where == SHIPPED
                and resources.files(SHIPPED).joinpath(group, f"{option}.yaml").is_file()
            ):
                found[f"{group}={option}"] = "shipped"
                break
    return found


GROUPS = ("model", "precision", "sharding", "wrap", "ac", "optim", "data", "cluster", "experiment")
"""The config groups in train.yaml's order (the order they are shown in)."""


def describe(found: Mapping[str, str]) -> str:
    """One line: ``configs: model=t5_tiny (DIR/model/t5_tiny.yaml), precision=fp32 (shipped), ...``."""

    def order(choice: str) -> int:
        group = choice.partition("=")[0]
        return GROUPS.index(group) if group in GROUPS else len(GROUPS)

    return "configs: " + ", ".join(f"{choice} ({found[choice]})" for choice in sorted(found, key=order))
