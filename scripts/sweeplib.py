"""Experiment grids for fxp-train: expansion into runs, selection, sharding and
a resumable runner. Used by scripts/sweep.py and the tests; docs/sweeps.md
describes the grid format.

A grid (configs/grids/*.yaml) has a `name`, `base` settings shared by all runs,
and `blocks`. Each block may `set` more settings and has `axes`: an ordered
mapping from a key to a list of values. A block's runs are the Cartesian
product of its axes, in order. A value that is a mapping sets several keys at
once (the `format` axis sets the four format keys).

load_grid checks a grid before anything runs: known keys only (setting keys are
fxp-train's config keys, from `fxp-train --print-config`), the right shapes,
and every error one line that names the file and the place.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import fcntl
import itertools
import json
import math
import os
import pathlib
import re
import string
import subprocess
import threading
import time
from typing import Callable, Collection, Iterable

import yaml

from argtypes import nearest_existing
from measurement_csv import device_kind, read_rows, shown

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Run:
    grid: str
    id: str  # stable, filesystem-safe; unique within the grid
    settings: tuple  # sorted (key, value) pairs: fxp-train config keys
    # Why fxp-train would refuse the run ("" if it would not). Such a run still
    # runs, fails alone, and leaves its failed.json, as any failing run does.
    invalid: str = dataclasses.field(default="", compare=False)
    # fxp-train's resolution of `settings` (resolve's "config": every key, its
    # defaults filled in), as sorted pairs; empty for a Run made by hand.
    resolved: tuple = dataclasses.field(default=(), compare=False, repr=False)
    # fxp-train's defaults (the config of no settings), as sorted pairs: what a
    # finished run's record that lacks a key had (differences()).
    defaults: tuple = dataclasses.field(default=(), compare=False, repr=False)
    # The grid's id of this run before --set overrides changed it ("": none did).
    origin: str = dataclasses.field(default="", compare=False)
    # The grid's values that use ${...} (sorted (key, value) pairs), as written: `settings` holds them
    # filled in, and select fills them in again after --set.
    templates: tuple = dataclasses.field(default=(), compare=False, repr=False)
    # The settings whose values follow fxp-train's name in the id (Note [Run ids of runs fxp-train names alike]).
    id_keys: tuple = dataclasses.field(default=(), compare=False, repr=False)
    # The settings the run does not read (fxp-train's Note [Settings without effect]), sorted.
    unread: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def config(self) -> dict:
        """The settings as the grid (and --set) give them."""
        return dict(self.settings)

    @property
    def full_config(self) -> dict:
        """Every setting as fxp-train resolves it (defaults included); the given ones for a Run made by hand."""
        return dict(self.resolved) if self.resolved else self.config


# $FXP_TRAIN, else the checkout's build (scripts/setup.sh).
DEFAULT_FXP_TRAIN = pathlib.Path(os.environ.get("FXP_TRAIN") or ROOT / "build" / "fxp-train")


def resolve(settings: list[dict], fxp_train: str | os.PathLike = DEFAULT_FXP_TRAIN) -> list[dict]:
    """fxp-train's own resolution of each run's settings (Note [Run names come
    from fxp-train] in csrc/train/config.h): {"run_name", "output_dir",
    "config" (every key, defaults filled in), "invalid" (why it would fail, if
    it would)} or {"error"}. One process for all."""
    text = "".join(json.dumps(s) + "\n" for s in settings)
    try:
        p = subprocess.run([str(fxp_train), "--print-configs", "-"], input=text, capture_output=True, text=True,
                           timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"cannot run {fxp_train} --print-configs: {e}") from None
    results = [json.loads(line) for line in p.stdout.splitlines()] if p.returncode == 0 else []
    if len(results) != len(settings):
        raise ValueError(f"{fxp_train} --print-configs failed: {p.stderr.strip()[-500:] or 'no answer'}")
    return results


def resolved_runs(runs: list[Run], fxp_train: str | os.PathLike = DEFAULT_FXP_TRAIN) -> list[dict]:
    """fxp-train's resolution of each run (resolve: its full "config" and its "epoch_images"), for
    estimates: no defaults or dataset sizes are repeated here. A run that would fail is an error."""
    results = resolve([r.config for r in runs], fxp_train)
    for r, res in zip(runs, results):
        if "error" in res or "invalid" in res:
            raise ValueError(f"run {r.id}: {res.get('error') or res['invalid']}")
    return results


def _resolve_with_defaults(settings: list[dict], fxp_train) -> tuple[list[dict], tuple]:
    """resolve(settings), and fxp-train's defaults (the config of no settings) as sorted pairs: one process."""
    results = resolve([*settings, {}], fxp_train)
    return results[:-1], tuple(sorted(results[-1]["config"].items()))


def _run(grid: str, settings: dict, res: dict, defaults: tuple, origin: str = "", templates: dict | None = None) -> Run:
    return Run(grid, res["run_name"], tuple(sorted(settings.items())), res.get("invalid", ""),
               tuple(sorted(res["config"].items())), defaults, origin, tuple(sorted((templates or {}).items())),
               unread=tuple(sorted(set(res.get("unread", ())))))


# Note [Run ids of runs fxp-train names alike]
# fxp-train's run name holds what the paper's grids vary (method, formats,
# batch size, seed, ...), not lr, momentum, weight decay or the schedule, which
# a grid's base fixes. A grid that varies one of those (axes: {lr: [0.01,
# 0.05]}) would give two runs one name; such runs get a suffix per setting in
# which they differ, in key order, from their resolved configs:
# sqpu-p16.10-o16.8-sr-b64-s0-lr0.05. Runs named alike that differ in nothing
# the sweep compares (NEVER_CONFLICT) or the runs read (fxp-train's "unread":
# param_frac under fp32) are the same run, still an error. The
# same grid gives the same ids on every machine, so a sweep resumes them, and
# select keeps a run's suffix keys (`kept`) whatever it filters out.
def _distinct_ids(runs: list["Run"], kept: list[tuple] | None = None) -> list["Run"]:
    """`runs` named by fxp-train alone, with the suffixes that set apart those it names alike."""
    by_id: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        by_id.setdefault(r.id, []).append(i)
    out = list(runs)
    for indices in by_id.values():
        unread = {k for i in indices for k in runs[i].unread}
        configs = [{k: v for k, v in runs[i].resolved if k not in NEVER_CONFLICT and k not in unread}
                   for i in indices]
        varying = varying_keys(configs)
        for i, c in zip(indices, configs):
            keys = tuple(sorted(varying | set(kept[i] if kept else ())))
            if keys:
                out[i] = dataclasses.replace(runs[i], id=runs[i].id + "".join(f"-{k}{_id_text(k, c.get(k))}" for k in keys),
                                             id_keys=keys)
    return out


def varying_keys(configs: list[dict]) -> set[str]:
    """The keys whose values are not the same in every one of `configs` (a key one lacks counts as None)."""
    keys = {k for c in configs for k in c}
    return {k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1}


def _id_text(key: str, value) -> str:
    """A setting's value in a run id: filesystem-safe, the shortest text (0.05, not 0.050000); a file by its
    directory's name (a checkpoint by its run's id), not by a path that holds --out."""
    if key in FILE_KEYS and isinstance(value, str) and value:
        value = pathlib.Path(value).parent.name or value
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def plural(n: int, thing: str) -> str:
    """"1 run", "2 runs", "0 runs": the count and the noun, in the plural unless there is one."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def same_value(a, b) -> bool:
    """Two JSON values equal as fxp-train compares them: numbers by value (1 == 1.0), a boolean only
    to a boolean (Python's True == 1 is not fxp-train's)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


class Loader(yaml.SafeLoader):
    """YAML with scalars read as fxp-train's config reader reads them
    (csrc/train/config.cpp, YamlReader::plain), so that a grid, --set and
    `fxp-train -c` agree. PyYAML implements YAML 1.1: its floats need a dot (1e-3
    would be the string '1e-3'), its integers take C's bases and sexagesimals
    (010 is 8), and yes/no/on/off are booleans. Here floats are YAML 1.2's (1e-3,
    1E5, .5, -2.5e+3), integers decimal (010 is 10), and booleans true/false
    (True/False); anything else is a string, which fxp-train names if its key
    wants another type. Used for grids, --set and --filter."""


_REPLACED = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")
Loader.yaml_implicit_resolvers = {  # copied per first character, without YAML 1.1's number and boolean rules
    c: [(tag, rx) for tag, rx in rules if tag not in _REPLACED]
    for c, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(  # a dot or an exponent, so that 1 stays an int
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))
Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|false|False)$"), list("tTfF"))


def _decimal_int(loader: Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if not re.fullmatch(r"[-+]?[0-9]+", text):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a decimal integer", node.start_mark)
    return int(text, 10)


Loader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def _mapping_without_repeats(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are all different: YAML would keep the last of two silently."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def parse_yaml(text: str):
    """YAML text to a value; errors are one-line ValueErrors with the line and column."""
    try:
        return yaml.load(text, Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(where + (getattr(e, "problem", None) or str(e))) from None


GRID_KEYS = ("name", "base", "blocks")
BLOCK_KEYS = ("name", "set", "axes")


def config_keys(fxp_train: str | os.PathLike) -> set[str]:
    """fxp-train's config keys: those of the JSON object `fxp-train --print-config` prints."""
    try:
        p = subprocess.run([str(fxp_train), "--print-config"], capture_output=True, text=True, timeout=120)
        keys = set(json.loads(p.stdout)) if p.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        keys = None
    if not keys:
        raise ValueError(f"{fxp_train} --print-config did not print its settings; rebuild it or pass --fxp-train")
    return keys


def _known(found: Iterable[str], allowed: Iterable[str], where: str, what: str = "key") -> None:
    allowed = sorted(allowed)
    for k in found:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, 1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else "fxp-train --print-config lists them" if what == "setting"
                    else f"allowed: {', '.join(allowed)}")
            raise ValueError(f"{where}: unknown {what} {k!r} ({hint})")


def check_settings(settings, where: str, keys: set[str] | None) -> dict:
    """A mapping of fxp-train settings (None is empty). keys=None: names not checked."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: expected a mapping of setting to value, got {settings!r}")
    if keys is not None:
        _known(settings, keys, where, "setting")
    for k, v in settings.items():
        if isinstance(v, (dict, list)):
            raise ValueError(f"{where}: {k} must be a single value, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):  # .nan, .inf: JSON, which fxp-train reads, has neither
            raise ValueError(f"{where}: {k} must be a finite number, got {v}")
    return settings


def load_grid(path: str | os.PathLike, keys: set[str] | None = None) -> dict:
    """Reads and checks a grid. `keys`: fxp-train's config keys (config_keys());
    None leaves setting names unchecked. Errors name the file and the place."""
    path = pathlib.Path(path)
    try:
        grid = parse_yaml(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read grid {path}: {e}") from None
    where = f"grid {path}"
    if not isinstance(grid, dict):
        raise ValueError(f"{where}: expected a mapping with name, base and blocks")
    _known(grid, GRID_KEYS, where)
    grid.setdefault("name", path.stem)
    # It names the output directory, results/<name>: one path component.
    if (not isinstance(grid["name"], str) or not grid["name"] or "/" in grid["name"] or "\\" in grid["name"]
            or grid["name"] in (".", "..")):
        raise ValueError(f"{where}: name must be a non-empty string without '/' (it names the directory "
                         f"results/<name>), but got {grid['name']!r}")
    check_settings(grid.get("base"), f"{where}, base", keys)
    blocks = grid.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{where}: blocks must be a non-empty list of blocks, got {blocks!r}")
    for b, block in enumerate(blocks):
        at = f"{where}, block {b}"
        if not isinstance(block, dict):
            raise ValueError(f"{at}: expected a mapping with set and axes, got {block!r}")
        at += f" ({block['name']})" if block.get("name") else ""
        _known(block, BLOCK_KEYS, at)
        fixed = check_settings(block.get("set"), f"{at}, set", keys)
        axes = block.get("axes") or {}
        if not isinstance(axes, dict):
            raise ValueError(f"{at}: axes must be a mapping of key to values, got {axes!r}")
        for key, options in axes.items():
            if not isinstance(options, list) or not options:
                raise ValueError(f"{at}, axis {key}: needs a non-empty list of values, got {options!r}")
            # A mapping sets several keys; the axis's own name is then a label.
            given = [check_settings(opt if isinstance(opt, dict) else {key: opt}, f"{at}, axis {key}", keys)
                     for opt in options]
            # An axis's value replaces set's in its runs (expand). Where every option gives a key, set's
            # value reaches no run, unsaid; where some do not, it is their default, and stays.
            lost = next((k for k in fixed if all(k in g for g in given)), None)
            if lost is not None:
                axis = "axes" if lost == key else f"axis {key}"
                raise ValueError(f"{at}: {lost} is in both set and {axis}, whose every value replaces set's "
                                 f"({lost}: {json.dumps(fixed[lost])}), which no run keeps; give it in one of them")
    return grid


def default_out(grid_name: str) -> pathlib.Path:
    """Where a grid's runs go without `sweep --out`: results/<name> in the checkout."""
    return ROOT / "results" / grid_name


def expand(grid: dict, fxp_train: str | os.PathLike = DEFAULT_FXP_TRAIN,
           out: str | os.PathLike | None = None) -> list[Run]:
    """Every run of the grid, in grid order, named by fxp-train (resolve), which
    also checks every value (Run.invalid). Run ids must come out unique.
    `${out}` and `${KEY}` in a value become the sweep's output directory
    (`out`, default_out without it) and the run's setting KEY; a run that
    starts from another run's checkpoint under `out` must name a run of the
    grid (Note [Runs that start from other runs])."""
    out = pathlib.Path(out) if out is not None else default_out(grid["name"])
    every: list[dict] = []  # as the grid writes them
    filled: list[dict] = []  # with ${...} filled in
    base = dict(grid.get("base") or {})
    for b, block in enumerate(grid["blocks"]):
        fixed = {**base, **(block.get("set") or {})}
        values = []
        for key, options in (block.get("axes") or {}).items():  # checked by load_grid
            values.append([opt if isinstance(opt, dict) else {key: opt} for opt in options])
        where = f"grid {grid['name']}, block {b}" + (f" ({block['name']})" if block.get("name") else "")
        for combo in itertools.product(*values):
            settings = dict(fixed)
            for part in combo:
                settings.update(part)
            every.append(settings)
            filled.append(_substitute(settings, out, where))
    runs: list[Run] = []
    results, defaults = _resolve_with_defaults(filled, fxp_train)
    for raw, settings, res in zip(every, filled, results):
        if "error" in res:
            raise ValueError(f"grid {grid['name']}: the run {settings} is invalid: {res['error']}")
        runs.append(_run(grid["name"], settings, res, defaults, templates=_templates(raw)))
    runs = _distinct_ids(runs)  # Note [Run ids of runs fxp-train names alike]
    seen: dict[str, Run] = {}
    for r in runs:
        if r.id in seen:
            why = next((f" ({x.invalid})" for x in (seen[r.id], r) if x.invalid), "")
            raise ValueError(f"grid {grid['name']}: two runs share the id {r.id}; "
                             f"their settings are {seen[r.id].config} and {r.config}{why}")
        seen[r.id] = r
    _check_sources(runs, out, f"grid {grid['name']}")
    return runs


# ---- runs that start from other runs ------------------------------------------------

# Note [Runs that start from other runs]
# A run may start from another run's checkpoint (init_from): MSQ fine-tunes a
# trained float32 model. A grid names that checkpoint through the sweep's
# output directory (made absolute) and the run's own settings,
#   init_from: ${out}/lenet5-fp32-b${batch_size}-s${seed}/checkpoint.pt
# so the path holds for any --out, any working directory and any --set (select
# fills the values in again). When the path lies in a run directory under the
# output directory, the run *depends* on that run (source_run), and the sweep:
#   - requires the source to be a run of the grid (a typo is an error before
#     anything runs, not a failure hours later), and no chain of sources to
#     come back to the run;
#   - keeps a run and its sources in one shard (shard), so a SLURM array task
#     never waits on another's;
#   - starts the run only once its source has finished (execute): a checkpoint
#     of an unfinished run exists after its first epoch, and starting from it
#     would quietly fine-tune a half-trained model. Any init_from that lies in a
#     run directory (one with a config.json) is judged the same way, so a
#     source from another grid (${out}/../msq-resnet20-fp32/...) must have
#     finished too, and not be training again (busy). A run whose source is
#     not finished, or does not exist, waits: it is not started and not
#     failed, and the sweep exits with 75 (run it again later), as for a busy
#     run. So does a run whose source's directory holds a finished run of
#     other settings (a conflict): its checkpoint is not the grid's source.
# Runs with init_from never share a fleet (fxp-train's fleet_group), so a fleet
# never waits on one of its own members.


def _substitute(settings: dict, out: pathlib.Path, where: str) -> dict:
    """`settings` with `${out}` and `${KEY}` (the run's own setting KEY) replaced in every string value;
    `$$` is a `$`. A value that uses ${out} is a path, made normal (os.path.normpath), so that
    `${out}/../other` names its file before `${out}` exists."""
    templates = _templates(settings)
    names = {key: value if isinstance(value, str) else json.dumps(value) for key, value in settings.items()
             if key not in templates}
    names["out"] = os.path.abspath(out)  # the same path from any working directory
    done = {}
    for key, value in settings.items():
        if key not in templates:
            done[key] = value
            continue
        try:
            template = string.Template(value)
            done[key] = template.substitute(names)
            if any("out" in (m.group("named"), m.group("braced")) for m in template.pattern.finditer(value)):
                done[key] = os.path.normpath(done[key])
        except KeyError as e:
            name = e.args[0]
            if name in templates:
                raise ValueError(f"{where}, {key}: {value!r}: ${{{name}}} is filled in itself; write its value "
                                 f"out") from None
            raise ValueError(f"{where}, {key}: {value!r}: ${{{name}}} is neither ${{out}} nor a setting of "
                             f"this run ({', '.join(sorted(k for k in settings if k != key))})") from None
        except ValueError:
            raise ValueError(f"{where}, {key}: {value!r}: a '$' starts ${{out}} or ${{KEY}}, a setting of the "
                             f"run; write $$ for a '$' itself") from None
    return done


def _templates(settings: dict) -> dict:
    """The values of `settings` that use ${...} (or $$)."""
    return {key: value for key, value in settings.items() if isinstance(value, str) and "$" in value}


def source_run(r: Run, out: str | os.PathLike) -> str | None:
    """The id of the run under `out` whose directory holds r's init_from; None when it is elsewhere or unset."""
    source = r.config.get("init_from")
    if not isinstance(source, str) or not source:
        return None
    d = pathlib.Path(os.path.abspath(source)).parent
    return d.name if d.parent == pathlib.Path(os.path.abspath(out)) else None


def _check_sources(runs: list[Run], out: pathlib.Path, where: str, whole_grid: bool = True) -> None:
    """No run starts from its own checkpoint, however far back; and, for a whole grid's runs, every
    source under `out` is one of them (a selection may leave sources out)."""
    ids = {r.id for r in runs}
    sources = {r.id: source_run(r, out) for r in runs}
    for r in runs:
        s = sources[r.id]
        if whole_grid and s is not None and s not in ids:
            close = difflib.get_close_matches(s, ids, n=1)
            raise ValueError(f"{where}: run {r.id} starts from {r.config['init_from']}, in the output directory, "
                             f"but {s} is no run of the grid" + (f" (did you mean {close[0]}?)" if close else ""))
        chain = [r.id]
        while s is not None:
            if s in chain:
                loop = chain[chain.index(s):] + [s]
                raise ValueError(f"{where}: run {s} starts from its own checkpoint" if len(loop) == 2 else
                                 f"{where}: runs start from each other's checkpoints: {' from '.join(loop)}")
            chain.append(s)
            s = sources.get(s)


def conflicting_sources(runs: list[Run], grid_runs: list[Run], out: str | os.PathLike,
                        overrides: dict | None = None, fxp_train: str | os.PathLike = DEFAULT_FXP_TRAIN,
                        device: str | None = None) -> set[str]:
    """The ids of the runs' sources under `out` (source_run) whose directories hold a finished run of
    other settings than the grid's (status conflict): those among `runs` and those a selection left
    out, found among the whole grid's runs (`grid_runs`, expand's) after the same --set and --device."""
    known = {r.id: r for r in runs}
    wanted = {s for r in runs if (s := source_run(r, out)) is not None}
    if wanted - known.keys():
        whole = grid_runs
        if overrides or device:
            try:
                whole = select(grid_runs, overrides=overrides, fxp_train=fxp_train, device=device, out=out)
            except ValueError:  # the override cannot hold for the whole grid: judge the selection's alone
                whole = []
        known.update({r.id: r for r in whole if r.id in wanted and r.id not in known})
    return {s for s in wanted if s in known and status(pathlib.Path(out), known[s]) == "conflict"}


def waits_for(r: Run, out: str | os.PathLike, conflicting: Collection[str] = ()) -> str:
    """Why `r` cannot start yet ("" when it can): its init_from does not exist, or lies in a run
    directory whose run has not finished, or whose run is one of `conflicting` (the ids of the
    grid's runs under `out` whose directories hold a run of other settings) (Note [Runs that start
    from other runs])."""
    source = r.config.get("init_from")
    if not isinstance(source, str) or not source:
        return ""
    path = pathlib.Path(source)
    if not path.exists():
        return f"it starts from {source}, which does not exist yet"
    d = path.parent
    if busy(d):
        return f"it starts from {source}, whose run is training (busy)"
    if source_run(r, out) in conflicting:
        return f"it starts from {source}, whose directory holds a run of other settings than the grid's (conflict)"
    if (d / "config.json").exists() and not (d / "summary.json").exists():
        if (d / "failed.json").exists():
            return f"it starts from {source}, whose run failed ({d / 'failed.json'})"
        return f"it starts from {source}, whose run has not finished"
    return ""


def parse_filters(filters: Iterable[str], keys: set[str] | None = None) -> dict[str, set[str]]:
    """--filter KEY=V[,V]; KEY is a setting (checked when `keys` is given) or `format`.
    The values stay text here; select reads each as YAML, as a grid's value."""
    out: dict[str, set[str]] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--filter {f!r}: expected KEY=VALUE[,VALUE...]")
        if keys is not None:
            _known([key], keys | {"format"}, f"--filter {f}", "setting")
        values = value.split(",")
        if key == "format":  # compared as text with the runs' labels: a malformed one would match nothing, unsaid
            for v in values:
                if not re.fullmatch(r"[0-9]+/[0-9]+/[0-9]+", v):
                    raise ValueError(f"--filter {f}: expected format=TOTAL/FRAC/OUTFRAC[,...], whole numbers "
                                     f"(param_bits/param_frac/out_frac, e.g. format=16/10/8), got {v!r}")
            values = ["/".join(str(int(n)) for n in v.split("/")) for v in values]  # 016/10/08 is 16/10/8
        out.setdefault(key, set()).update(values)
    return out


def parse_assignments(items: Iterable[str], keys: set[str] | None = None) -> dict:
    """--set KEY=VALUE: the value is read as the grids' YAML, so 5 and 1e-3 are numbers and sr a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = parse_yaml(value)
        except ValueError as e:
            raise ValueError(f"--set {item}: {e}") from None
        out.update(check_settings({key: value}, f"--set {item}", keys))
    return out


_UNPARSED = object()
# Methods without a fixed format (their run names carry none): --filter format=... never matches them.
FORMATLESS_METHODS = ("fp32", "adapt", "msq")


def _filter_value(text: str):
    try:
        return parse_yaml(text)
    except ValueError:
        return _UNPARSED  # compared as text only


def _matches(run: Run, key: str, wanted: list[tuple[str, object]]) -> bool:
    """Whether the run's resolved value of `key` (or the value the grid writes, where fxp-train would
    refuse it) is one of `wanted`: (text, the text read as YAML) pairs. A string value also matches its text
    exactly (`--filter dataset=no`, which YAML reads as false). `format` is the run's
    param_bits/param_frac/out_frac, for the methods that have one."""
    full = run.full_config
    if key == "format":  # the label of the methods whose run names carry a format, as the report's
        if full.get("method") in FORMATLESS_METHODS:
            return False
        label = f"{full.get('param_bits')}/{full.get('param_frac')}/{full.get('out_frac')}"
        return any(text == label for text, _ in wanted)
    values = [full[key]] if key in full else []
    if key in run.config and run.config[key] not in values:
        values.append(run.config[key])
    return any((parsed is not _UNPARSED and same_value(parsed, v)) or (isinstance(v, str) and v == text)
               for v in values for text, parsed in wanted)


def _describe(overrides: dict, device: str | None = None) -> str:
    """The overrides as the command line gives them: --set k=v ... --device d."""
    def text(v):
        return v if isinstance(v, str) else json.dumps(v)
    return " ".join([f"--set {k}={text(v)}" for k, v in overrides.items()] + ([f"--device {device}"] if device else []))


def select(runs: list[Run], filters: dict[str, set[str]] | None = None, seeds: int | None = None,
           overrides: dict | None = None, fxp_train: str | os.PathLike = DEFAULT_FXP_TRAIN,
           device: str | None = None, out: str | os.PathLike | None = None) -> list[Run]:
    """Keeps the runs whose settings match every filter, and only the first
    `seeds` seeds of the grid; then applies `overrides` (and `device`, the
    sweep's --device) to every run. Filters compare fxp-train's resolved
    settings, defaults included, with each value read as YAML, as a grid's
    (`method=sqpu,ste`, `weight_decay=5e-4`, `msq_hessian=false`,
    `update=float` where the grid relies on the default; `format=16/10/8`).
    Overridden runs are resolved again by fxp-train (one process) and named
    by their settings after the overrides, and the grid's ${...} values are
    filled in again from them (`out`: the sweep's output directory, default_out
    without it). Errors (ValueError), before
    anything runs: an override that makes a run fxp-train would have run one
    it refuses (`--set epochs=abc`), and two runs that come out with one id
    (`--set seed=7` on a grid over seeds)."""
    filters = filters or {}
    if seeds is not None:
        kept = sorted({r.full_config.get("seed", 0) for r in runs})[:seeds]
        runs = [r for r in runs if r.full_config.get("seed", 0) in kept]
    for key, allowed in filters.items():
        wanted = [(text, _filter_value(text)) for text in sorted(allowed)]
        runs = [r for r in runs if _matches(r, key, wanted)]
    changes = {**(overrides or {}), **({"device": device} if device else {})}
    if not changes or not runs:
        return runs
    # The grid's ${...} values are filled in again, from the settings after the overrides.
    raw = [{**r.config, **dict(r.templates), **changes} for r in runs]
    out = pathlib.Path(out) if out is not None else default_out(runs[0].grid)
    changed = [_substitute(settings, out, _describe(overrides or {}, device)) for settings in raw]
    results, defaults = _resolve_with_defaults(changed, fxp_train)
    new = []
    for r, settings, res, template in zip(runs, changed, results, raw):
        if "error" in res:
            raise ValueError(f"{_describe(overrides or {}, device)}: the run {settings} is invalid: {res['error']}")
        new.append(_run(r.grid, settings, res, defaults, r.origin or r.id, _templates(template)))
    broken = [(old, r) for old, r in zip(runs, new) if r.invalid and not old.invalid]
    if broken:
        old, r = broken[0]
        more = f" (and {plural(len(broken) - 1, 'more run')})" if len(broken) > 1 else ""
        raise ValueError(f"{_describe(overrides or {}, device)}: run {r.origin} would fail{more}: {r.invalid}")
    new = _distinct_ids(new, [r.id_keys for r in runs])  # Note [Run ids of runs fxp-train names alike]
    seen: dict[str, Run] = {}
    for r in new:
        if r.id in seen:
            a = seen[r.id]
            same = {k: v for k, v in a.resolved if k not in NEVER_CONFLICT} == \
                {k: v for k, v in r.resolved if k not in NEVER_CONFLICT}
            raise ValueError(f"{_describe(overrides or {}, device)}: the grid's runs {a.origin} and {r.origin} "
                             f"{'become the same run' if same else 'come out with one id'}, {r.id}; "
                             "select one of them (--filter) instead")
        seen[r.id] = r
    _check_sources(new, out, _describe(overrides or {}, device), whole_grid=False)
    return new


def shard(runs: list[Run], index: int, count: int, out: str | os.PathLike | None = None) -> list[Run]:
    """Shard `index` of `count`, sorted by id. Every run lands in exactly one shard, whatever machine
    computes it. A run that starts from another run of `runs` under `out` goes with it (Note [Runs
    that start from other runs]): such chains are dealt first, longest first, then the runs alone
    in id order, each to the shard with the fewest runs so far (the lowest of equals). So without
    chains shard i is every count-th run from i, and shards differ by at most one run."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: need 0 <= i < N")
    ordered = sorted(runs, key=lambda r: r.id)
    ids = {r.id for r in runs}
    sources = {r.id: source_run(r, out) if out is not None else None for r in runs}

    def root(run_id: str) -> str:  # chains are acyclic (_check_sources)
        while sources.get(run_id) in ids:
            run_id = sources[run_id]
        return run_id
    chains: dict[str, list[Run]] = {}
    for r in ordered:
        chains.setdefault(root(r.id), []).append(r)
    sizes = [0] * count
    mine = set()
    for first in sorted(chains, key=lambda first: (-len(chains[first]), first)):
        target = sizes.index(min(sizes))
        sizes[target] += len(chains[first])
        if target == index:
            mine.update(r.id for r in chains[first])
    return [r for r in ordered if r.id in mine]


def parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        return int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None


# ---- run state on disk ----------------------------------------------------------

def atomic_write_json(path: pathlib.Path, obj) -> None:
    # A temporary name per writer: two sweeps (or threads) may write one run's file at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_dir(out: pathlib.Path, run: Run) -> pathlib.Path:
    return out / run.id


def check_out(out: pathlib.Path) -> None:
    """--out is a directory, or can become one: its nearest existing ancestor is a directory."""
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a directory")


def make_out(out: pathlib.Path) -> None:
    """Creates --out (and its missing parents) before any run starts: a read-only file system or a
    directory this user may not write is one error here, not one per run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create {e.filename or out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # it exists: mkdir says nothing on a read-only file system
        raise ValueError(f"--out {out}: cannot write into it (a read-only file system, or no permission)")


# Settings that cannot change a run's results, so they never make a finished run
# a conflict: fxp-train's key_may_change_on_resume (csrc/train/config.cpp, the
# keys differing_settings skips), less epochs, which fxp-train compares too when
# it decides whether a directory already holds a finished run (decide_start,
# csrc/train/resume.cpp: "holds a finished run with other settings").
NEVER_CONFLICT = frozenset({"threads", "output_dir", "data_dir", "cuda_graphs"})

# Settings that name a file, compared by the file (same_file): fxp-train's key_names_a_file.
FILE_KEYS = frozenset({"init_from"})


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file, as fxp-train's same_file_path: equal as
    std::filesystem::weakly_canonical(absolute(path)) makes them (_weakly_canonical)."""
    return a == b or (bool(a) and bool(b) and _weakly_canonical(a) == _weakly_canonical(b))


def _weakly_canonical(path: str) -> str:
    """C++'s std::filesystem::weakly_canonical of the absolute path: the longest leading part that
    exists made canonical (symbolic links, `.` and `..` resolved), the rest appended, and the whole
    made lexically normal."""
    parts = pathlib.PurePath(os.path.join(os.getcwd(), path)).parts
    n = len(parts)
    while n > 1 and not os.path.exists(os.path.join(*parts[:n])):
        n -= 1
    return os.path.normpath(os.path.join(os.path.realpath(os.path.join(*parts[:n])), *parts[n:]))

# fxp-train holds flock(LOCK_EX) on <run dir>/.lock while it trains there, and
# exits with 75 (EX_TEMPFAIL) when another process holds it.
LOCK_FILE = ".lock"
BUSY_EXIT = 75


def busy(d: pathlib.Path) -> bool:
    """Whether another process (an fxp-train) holds the run directory's lock.
    Probes and releases at once: fxp-train would refuse a lock the sweep kept. A lock this user
    may not write (another user's results, a read-only file system) is probed as fxp-train takes
    it there (Note [Run directory lock] in csrc/train/io.h): shared, on a read-only descriptor."""
    lock = fcntl.LOCK_EX
    try:  # read-write: NFS emulates flock with fcntl locks, whose LOCK_EX needs it
        fd = os.open(d / LOCK_FILE, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False  # fxp-train never ran here
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd, lock = os.open(d / LOCK_FILE, os.O_RDONLY), fcntl.LOCK_SH
    try:
        fcntl.flock(fd, lock | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if the probe took it


def failure(d: pathlib.Path) -> str:
    """What failed.json in run directory `d` says went wrong, on one line (fxp-train's last lines of
    stderr are joined with " | "); the file itself if it holds no "error"."""
    try:
        text = (d / "failed.json").read_text()
    except OSError as e:
        return f"(cannot read {d / 'failed.json'}: {e.strerror or e})"
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    return " ".join(str(error).split()) if error else " ".join(text.split())


def finished_settings(d: pathlib.Path) -> dict | None:
    """The settings a finished run in `d` ran with (its summary.json's "config", what fxp-train compares);
    None when there is no summary, or one that cannot be read (fxp-train would then fail on it)."""
    try:
        config = json.loads((d / "summary.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def differences(stored: dict, run: Run) -> str:
    """The settings in which a finished run's record (`stored`) differs from `run`, as readable text ("":
    none). As fxp-train's differing_settings (csrc/train/config.cpp) with epochs compared: every key of
    fxp-train's resolution of the run but NEVER_CONFLICT, FILE_KEYS by the file they name, and a key
    the record lacks (the run is older than the key) has the key's default. A Run made by hand (no
    resolution) compares its given settings."""
    current = run.full_config
    defaults = dict(run.defaults)
    differ = []
    for key in sorted(current):
        if key in NEVER_CONFLICT:
            continue
        if key not in stored and key not in defaults:
            differ.append(f"{key} (not in the run, {json.dumps(current[key])} now)")
            continue
        was = stored[key] if key in stored else defaults[key]
        files = key in FILE_KEYS and isinstance(was, str) and isinstance(current[key], str)
        if not (same_file(was, current[key]) if files else same_value(was, current[key])):
            differ.append(f"{key} ({json.dumps(was)} in the run, {json.dumps(current[key])} now)")
    return ", ".join(differ)


def status(out: pathlib.Path, run: Run) -> str:
    """busy (an fxp-train holds its lock), done (its summary exists and is of
    these settings: every setting fxp-train resolves, defaults included, but
    those that cannot change results), conflict (a summary of other
    settings), failed (the last attempt failed), or pending."""
    d = run_dir(out, run)
    if busy(d):
        return "busy"
    if (d / "summary.json").exists():
        stored = finished_settings(d)
        if stored is None:
            return "pending"  # cannot happen with atomic writes; fxp-train reports it when it runs
        return "conflict" if differences(stored, run) else "done"
    return "failed" if (d / "failed.json").exists() else "pending"


Runner = Callable[[Run, pathlib.Path], None]  # raises RunFailed on failure
FleetRunner = Callable[[list[Run], list[pathlib.Path]], None]  # the same, for the runs of one fleet


class RunFailed(Exception):
    """A run failed: the message, and fxp-train's exit status where it exited with one (failed.json's exit_code)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


class RunBusy(Exception):
    """Another fxp-train holds the run's lock (it started after the sweep looked)."""


class Interrupted(Exception):
    """The sweep is stopping; the run is not failed and resumes next time."""


class Processes:
    """The fxp-train processes a sweep has running, so that stopping the sweep stops them."""

    def __init__(self):
        self.running: set = set()
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for p in list(self.running):
            p.terminate()
        for p in list(self.running):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_process(cmd: list[str], err, processes: Processes | None, run_id: str) -> int:
    """Runs cmd (stdout discarded, stderr to `err`) as one of `processes`; its exit code."""
    check_stopping(processes, run_id)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    if processes is not None:
        processes.running.add(p)
    try:
        return p.wait()
    finally:
        if processes is not None:
            processes.running.discard(p)


def check_stopping(processes: Processes | None, run_id: str) -> None:
    if processes is not None and processes.stopping:
        raise Interrupted(run_id)


def fxp_train_runner(fxp_train: str | os.PathLike, threads: int, device: str | None = None,
                     processes: Processes | None = None) -> Runner:
    """Runs fxp-train for one run: config from the run's settings, --resume
    (so a killed run continues from its checkpoint), quiet, stderr to a log."""
    def run(r: Run, d: pathlib.Path) -> None:
        atomic_write_json(d / "run.json", run_settings(r, threads, device, d))
        cmd = [str(fxp_train), "-c", str(d / "run.json"), "--resume", "--quiet"]
        with open(d / "stderr.log", "ab") as err:
            code = run_process(cmd, err, processes, r.id)
        check_stopping(processes, r.id)
        if code == BUSY_EXIT:
            raise RunBusy(r.id)
        if code != 0:
            tail = (d / "stderr.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RunFailed(f"fxp-train exited with {code}: " + " | ".join(tail), code)
    return run


# The end of fxp-train's error for a CUDA device where it finds none (parse_device in csrc/train/run.cpp,
# run_fleet's in csrc/train/fleet.cpp).
NO_GPU = "no CUDA device is available"


def missing_gpu(fxp_train: str | os.PathLike, device: str | None) -> str:
    """fxp-train's error when it finds no GPU for `device` ("" when it does, or for the CPU). fxp-train
    lists no devices, so one run is asked, in a temporary directory, with a data directory that does not
    exist: it stops at the device, or, on a GPU, at the data, before it trains. Any other failure is ""
    (the runs report it themselves)."""
    if device_kind(device) != "cuda":
        return ""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fxp-sweep-gpu-") as tmp:
        cmd = [str(fxp_train), "--device", str(device), "--output-dir", os.path.join(tmp, "run"),
               "--data-dir", os.path.join(tmp, "no-data"), "--epochs", "1", "--threads", "1", "--quiet"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return ""
    line = next((line for line in p.stderr.splitlines() if NO_GPU in line), "")
    return line.removeprefix("fxp-train: error: ").strip()


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM allocation's, not the node's), as fxp-train counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_memory_gib() -> float | None:
    """The memory this sweep's runs may use, in GiB: a SLURM allocation's (SLURM_MEM_PER_NODE, or
    SLURM_MEM_PER_CPU times the usable CPUs; both in MB), else the machine's available memory
    (/proc/meminfo's MemAvailable); None where neither is known."""
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        return int(os.environ["SLURM_MEM_PER_NODE"]) / 1024
    if os.environ.get("SLURM_MEM_PER_CPU", "").isdigit():
        return int(os.environ["SLURM_MEM_PER_CPU"]) * usable_cpus() / 1024
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 ** 2  # kB
    except OSError:
        pass
    return None


def default_jobs(device: str | None, threads: int | None, cpus: int, memory_gib: float | None) -> int:
    """`sweep --jobs` when it is not given. On a GPU one process. On the CPU one process per
    `threads` CPUs, and per CPU when --threads is not given either: OpenMP's threads wait for each
    other at every call, so two one-thread runs of the paper CNN train 1.6-1.85x the images of one
    two-thread run at batch 1, and 1.02-1.2x at batch 64 and 256 (docs/benchmarks.md, "Fleets
    against solo runs"). At most one process per GiB of `memory_gib` (a paper-CNN run on
    Fashion-MNIST holds about 0.7 GB)."""
    if device and device.startswith("cuda"):
        return 1
    jobs = max(1, cpus // (threads or 1))
    if memory_gib is not None:
        jobs = min(jobs, max(1, int(memory_gib)))
    return jobs


def jobs_and_threads(jobs: int | None, threads: int | None, device: str | None, cpus: int,
                     memory_gib: float | None) -> tuple[int, int]:
    """(jobs, threads per job): as given, else the defaults of scripts/sweep (default_jobs; threads:
    the CPUs divided among the jobs). Threads 0 (LibTorch's default: every CPU) is one job."""
    if jobs is None:
        jobs = 1 if threads == 0 else default_jobs(device, threads, cpus, memory_gib)
    if threads is None:
        threads = max(1, cpus // jobs)
    return jobs, threads


def oversubscription(jobs: int, threads: int, device: str | None, cpus: int) -> str:
    """Why jobs x threads is too many for `cpus` CPUs ("" when it is not): OpenMP's waiting threads
    spin, so a run that shares its cores loses most of its speed (docs/train.md, "Threads and a busy
    machine"). GPU runs use a thread or so each and are not counted."""
    if (device or "cpu").startswith("cuda") or jobs * threads <= cpus:
        return ""
    return (f"{plural(jobs, 'job')} x {plural(threads, 'thread')} is more than the {plural(cpus, 'CPU')} this sweep "
            f"may use: runs that share cores can be several times slower (docs/train.md, \"Threads and a busy "
            f"machine\"); lower --jobs or --threads")


def fleet_size_for(batch_size: int, device: str | None, threads: int) -> int:
    """The members of a fleet when `sweep --fleet` is not given, from scripts/bench_fleet.py's
    measurements (docs/benchmarks.md, "Fleets against solo runs"). On the CPU a fleet shares what
    each solo run pays per call, and a solo run on 2 or more threads pays most there (its threads
    wait for each other at every call): fleets gain most at batch 1 (more with more members), some
    up to batch 16 and nothing beyond 32. On one thread per process (`--jobs` as many as the CPUs)
    a solo run wastes little, and fleets gain a few percent up to batch 4 and lose from batch 16.
    A GPU, bound by kernel launches up to larger batches, takes more members."""
    if device and device.startswith("cuda"):
        return 80 if batch_size <= 16 else 32 if batch_size <= 64 else 8
    if threads == 1:
        return 80 if batch_size <= 2 else 32 if batch_size <= 4 else 1
    return 80 if batch_size <= 2 else 32 if batch_size <= 8 else 8 if batch_size <= 32 else 1


def plan_fleets(runs: list[Run], fxp_train: str | os.PathLike, threads: int, device: str | None,
                fleet: int | None) -> list[list[Run]]:
    """The runs in fleets (fxp-train --fleet), in grid order: runs fxp-train puts in one fleet
    group (--print-configs' fleet_group: same model, dataset, method, batch size, ...) share
    fleets of at most `fleet` members (None: fleet_size_for the run's batch size and device, as
    fxp-train resolves them, and `threads`). A run that cannot join a fleet, or whose group leaves
    it alone, is a fleet of one (a solo run). `device` (--device, or None) goes into each run's settings."""
    if fleet == 1 or not runs:
        return [[r] for r in runs]
    results = resolve([run_settings(r, threads, device) for r in runs], fxp_train)
    groups: dict[str, list[Run]] = {}
    units: list[list[Run]] = []
    for r, res in zip(runs, results):
        group = res.get("fleet_group")
        if not group or r.invalid:
            units.append([r])
            continue
        size = fleet or fleet_size_for(res["config"]["batch_size"], res["config"]["device"], threads)
        members = groups.setdefault(group, [])
        if not members:
            units.append(members)
        members.append(r)
        if len(members) >= size:
            groups.pop(group)  # full: the next run of this group starts another fleet
    return units


def run_settings(r: Run, threads: int, device: str | None, d: pathlib.Path | None = None) -> dict:
    """The settings fxp-train runs `r` with: its config, the sweep's threads and device, its directory."""
    settings = dict(r.config)
    settings["threads"] = threads
    if device:
        settings["device"] = device
    if d is not None:
        settings["output_dir"] = str(d)
    return settings


def fxp_train_fleet_runner(fxp_train: str | os.PathLike, threads: int, device: str | None = None,
                           processes: Processes | None = None) -> FleetRunner:
    """Runs fxp-train --fleet for runs that share a fleet: each member's settings in its run.json
    and one line of <first member>/fleet.jsonl, --resume (a killed fleet resumes every member),
    quiet; the fleet's stderr is appended to every member's stderr.log."""
    def run(rs: list[Run], ds: list[pathlib.Path]) -> None:
        lines = []
        for r, d in zip(rs, ds):
            settings = run_settings(r, threads, device, d)
            atomic_write_json(d / "run.json", settings)
            lines.append(json.dumps(settings))
        fleet_file = ds[0] / "fleet.jsonl"
        fleet_file.write_text("\n".join(lines) + "\n")
        log = ds[0] / "fleet-stderr.log"
        cmd = [str(fxp_train), "--fleet", str(fleet_file), "--resume", "--quiet"]
        with open(log, "wb") as err:
            code = run_process(cmd, err, processes, rs[0].id)
        text = log.read_text(errors="replace")
        for d in ds:
            with open(d / "stderr.log", "a") as f:
                f.write(text)
        log.unlink(missing_ok=True)
        check_stopping(processes, rs[0].id)
        if code == BUSY_EXIT:
            raise RunBusy(rs[0].id)
        if code != 0:
            raise RunFailed(f"fxp-train --fleet exited with {code}: " + " | ".join(text.strip().splitlines()[-5:]),
                            code)
    return run


def execute(runs: list[Run], out: pathlib.Path, runner: Runner, jobs: int = 1,
            on_update: Callable[[dict], None] | None = None,
            plan: Callable[[list[Run]], list[list[Run]]] | None = None,
            fleet_runner: FleetRunner | None = None, conflicting: Collection[str] = ()) -> dict:
    """Runs every run that is not done or busy, `jobs` at a time: alone, or in
    the fleets `plan` makes of them (fleets of more than one run go to
    `fleet_runner`). A failure is recorded in <run>/failed.json and the rest go
    on. A run that starts from another run's checkpoint starts after that run,
    and waits (is not started) while its source has not finished, or conflicts
    (a run of `runs`, or one of `conflicting`: conflicting_sources) (Note [Runs
    that start from other runs]). Returns the counts by status. Interrupting
    (KeyboardInterrupt) stops waiting; unfinished runs keep their checkpoints
    and resume next time."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    counts = {"done": 0, "failed": 0, "conflict": 0, "busy": 0, "waiting": 0, "pending": 0, "skipped": 0}
    todo, conflicting = [], set(conflicting)
    for r in runs:
        s = status(out, r)
        if s == "done":
            counts["skipped"] += 1
        elif s in ("conflict", "busy"):
            counts[s] += 1
            if s == "conflict":
                conflicting.add(r.id)
        else:
            todo.append(r)
    counts["pending"] = len(todo)
    if on_update:
        on_update(counts)
    units = plan(todo) if plan else [[r] for r in todo]

    def outcome(d: pathlib.Path, start: float, error: RunFailed | None) -> str:
        if error is not None:
            # exit_code apart from the text, so that a script need not parse "exited with N" out of error.
            code = {} if error.exit_code is None else {"exit_code": error.exit_code}
            atomic_write_json(d / "failed.json", {"error": str(error), **code, "seconds": time.time() - start,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return "failed"
        (d / "failed.json").unlink(missing_ok=True)
        if not (d / "summary.json").exists():
            atomic_write_json(d / "failed.json", {"error": "the run ended without a summary.json"})
            return "failed"
        return "done"

    def attempt(unit: list[Run]) -> list[str]:
        results, members, dirs = [], [], []
        for r in unit:
            d = run_dir(out, r)
            if busy(d):  # started elsewhere while this run waited in the queue
                results.append("busy")
                continue
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / "sweep-run.json", {"grid": r.grid, "id": r.id, "settings": r.config})
            members.append(r)
            dirs.append(d)
        if not members:
            return results
        start = time.time()
        error = None
        try:
            if len(members) == 1:
                runner(members[0], dirs[0])
            else:
                fleet_runner(members, dirs)
        except RunBusy:
            return results + ["busy"] * len(members)  # not failed: another process owns a directory
        except RunFailed as e:
            error = e
        # A fleet's member may have finished before another failed: each is what its directory holds.
        return results + [outcome(d, start, None if (d / "summary.json").exists() else error) for d in dirs]

    # A run whose source is still to run here waits for it (Note [Runs that start from other runs]).
    unfinished = {r.id for r in todo}
    sources = {r.id: s for r in todo if (s := source_run(r, out)) in unfinished}

    def next_unit() -> list[Run] | None:
        """Takes the first queued unit whose sources have run; one that still cannot start
        (waits_for) leaves the queue as waiting, and the search goes on."""
        i = 0
        while i < len(queue):
            unit = queue[i]
            if any(sources.get(r.id) in unfinished for r in unit):
                i += 1
                continue
            del queue[i]
            if not any(waits_for(r, out, conflicting) for r in unit):
                return unit
            counts["pending"] -= len(unit)
            counts["waiting"] += len(unit)
            unfinished.difference_update(r.id for r in unit)
        return None

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {}
    queue = list(units)
    try:
        while True:
            while len(futures) < max(1, jobs) and (unit := next_unit()) is not None:
                futures[pool.submit(attempt, unit)] = unit
            if on_update:
                on_update(counts)
            if not futures:
                break
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                for result in f.result():
                    counts["pending"] -= 1
                    counts[result] += 1
                unfinished.difference_update(r.id for r in futures.pop(f))
        assert not queue, "a queued run waits on a source that never runs (sources are acyclic: _check_sources)"
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
    return counts


# ---- wall-time estimates -----------------------------------------------------------

def _positive_number(row: dict, column: str, n: int) -> float:
    """A rate or ratio of a measurement CSV: a positive finite number (0 would divide by zero)."""
    try:
        x = float(row[column])
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"row {n}: {column} must be a positive finite number, got {shown(row[column])}")
    return x


def _count(row: dict, column: str, n: int) -> int:
    """A batch size or member count of a measurement CSV: a whole number of at least 1."""
    try:
        x = int(row[column])
    except (TypeError, ValueError):
        x = 0
    if x < 1:
        raise ValueError(f"row {n}: {column} must be a whole number of at least 1, got {shown(row[column])}")
    return x


def load_throughput(path, device: str | None = None) -> dict:
    """{(model, method): [(batch_size, train images/s, validation images/s), ...]} from bench_train.py's
    CSV (a CSV without a model column measured the paper's CNN; a method may carry bench_train's
    variants, as in sqpu:packed), of the rows measured on `device` (read_rows; None: every row). A
    missing column, or a value that is not a positive number, is a ValueError naming it."""
    table: dict = {}
    for n, row in read_rows(path, ("method", "batch_size", "train_images_per_s", "val_images_per_s"), device,
                            "scripts/bench_train.py"):
        key = (row.get("model") or "paper_cnn", row["method"])
        table.setdefault(key, []).append(
            (_count(row, "batch_size", n), _positive_number(row, "train_images_per_s", n),
             _positive_number(row, "val_images_per_s", n)))
    if not table:
        raise ValueError("no measurements")
    return {key: sorted(v) for key, v in table.items()}


def throughput_points(throughput: dict, config: dict) -> list:
    """The measured points for a run's model and method: its packed variant's where measured (bench_train's
    METHOD:packed), else the plain method's. A model or method without measurements is an error that names
    what the CSV holds, not a silent borrowing of another model's speed."""
    model, method = config.get("model", "paper_cnn"), config["method"]
    if config.get("packed") and (model, f"{method}:packed") in throughput:
        return throughput[(model, f"{method}:packed")]
    if (model, method) not in throughput:
        measured = ", ".join(f"{m} {me}" for m, me in sorted(throughput))
        raise ValueError(f"no throughput measured for model {model}, method {method} (measured: {measured}); "
                         f"run scripts/bench_train.py --model {model} --methods {method}")
    return throughput[(model, method)]


def _interpolate(points, batch: int, column: int) -> float:
    """Log-log interpolation over batch size, constant beyond the measured range."""
    import math
    if batch <= points[0][0]:
        return points[0][column]
    if batch >= points[-1][0]:
        return points[-1][column]
    for (b0, *v0), (b1, *v1) in zip(points, points[1:]):
        if b0 <= batch <= b1:
            t = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp((1 - t) * math.log(v0[column - 1]) + t * math.log(v1[column - 1]))
    raise AssertionError("unreachable")


def load_fleet_speedups(path, device: str | None = None) -> dict:
    """{(model, method): {K: [(batch_size, speed-up), ...]}} from scripts/bench_fleet.py's CSV (a CSV
    without a model column measured the paper's CNN), of the rows measured on `device`. Checked as
    load_throughput's."""
    table: dict = {}
    for n, row in read_rows(path, ("method", "batch_size", "members", "speedup"), device,
                            "scripts/bench_fleet.py"):
        key = (row.get("model") or "paper_cnn", row["method"])
        table.setdefault(key, {}).setdefault(_count(row, "members", n), []).append(
            (_count(row, "batch_size", n), _positive_number(row, "speedup", n)))
    if not table:
        raise ValueError("no measurements")
    return {key: {k: sorted(v) for k, v in ks.items()} for key, ks in table.items()}


def fleet_speedup(table: dict, method: str, batch: int, members: int, model: str = "paper_cnn") -> float:
    """A fleet's training speed-up over solo runs for `members` members: over batch sizes log-log,
    at the largest measured K not above `members` (below the smallest, log-linear from 1 at K = 1).
    1 where the model and method were not measured."""
    import math
    key = (model, method)
    if members <= 1 or key not in table:
        return 1.0
    ks = sorted(table[key])
    below = [k for k in ks if k <= members]
    k = below[-1] if below else ks[0]
    s = _interpolate(table[key][k], batch, 1)
    if not below:  # fewer members than any measured fleet
        s = math.exp(math.log(s) * math.log(members) / math.log(k))
    return s


def estimate_seconds(runs: list[dict], throughput: dict, typical_epochs: float | None = None,
                     fleet_speedups: dict | None = None, fleet_sizes: list[int] | None = None):
    """(earliest, typical, latest) total seconds of the runs, one at a time (run_seconds summed)."""
    per_run = run_seconds(runs, throughput, typical_epochs, fleet_speedups, fleet_sizes)
    return tuple(sum(s[k] for s in per_run) for k in range(3))


def run_seconds(runs: list[dict], throughput: dict, typical_epochs: float | None = None,
                fleet_speedups: dict | None = None, fleet_sizes: list[int] | None = None) -> list[tuple]:
    """Each run's (earliest, typical, latest) seconds,
    from fxp-train's resolution of each (resolved_runs: its "config" and its
    "epoch_images", the images an epoch trains and validates on). A run
    without early stopping lasts its epochs; one with it lasts between its
    minimum and its maximum, `typical_epochs` (default: the midpoint; a
    positive number, held between the two). With
    `fleet_sizes` (the size of each run's fleet) and `fleet_speedups`
    (load_fleet_speedups), a run's training goes faster by its fleet's
    measured speed-up; its validation (on its own model) does not."""
    if typical_epochs is not None and not (math.isfinite(typical_epochs) and typical_epochs > 0):
        raise ValueError(f"typical epochs must be a positive number, got {typical_epochs}")
    per_run = []
    for r, run in enumerate(runs):
        c, images = run["config"], run["epoch_images"]
        points = throughput_points(throughput, c)
        batch = c["batch_size"]
        speedup = 1.0
        if fleet_speedups is not None and fleet_sizes is not None:
            speedup = fleet_speedup(fleet_speedups, c["method"], batch, fleet_sizes[r],
                                    c.get("model", "paper_cnn"))
        per_epoch = (images["train"] / (_interpolate(points, batch, 1) * speedup)
                     + images["validation"] / _interpolate(points, batch, 2))
        most = c["epochs"]
        if c.get("early_stopping"):
            least = min(most, c["early_stopping_min_epochs"])
            typical = typical_epochs if typical_epochs is not None else (least + most) / 2
        else:
            least = typical = most
        per_run.append(tuple(epochs * per_epoch for epochs in (least, max(least, min(typical, most)), most)))
    return per_run


def wall_seconds(per_run: list[tuple], sources: list[int | None], jobs: int,
                 units: list[list[int]] | None = None) -> tuple:
    """(earliest, typical, latest) wall seconds of runs lasting `per_run` (run_seconds) on `jobs`
    jobs, where run i starts only after run sources[i] (an index; None: no source among them) has
    finished, and `units` (lists of run indices; default: each run alone) are the jobs' units: a
    fleet is one job, lasting its members' time together (bench_fleet's speed-up is the fleet's
    images/s over one solo run's). Each figure is the larger of the total over the jobs and the
    longest unit, or chain of units whose runs start from each other (Note [Runs that start from
    other runs]), which no number of jobs shortens."""
    units = units if units is not None else [[i] for i in range(len(per_run))]
    unit_of = {i: u for u, members in enumerate(units) for i in members}
    seconds = [tuple(sum(per_run[i][k] for i in members) for k in range(3)) for members in units]
    after = [{unit_of[s] for i in members if (s := sources[i]) is not None} - {u} for u, members in enumerate(units)]
    chain: dict[int, tuple] = {}  # seconds from the start of u's first source to u's end
    for first in range(len(units)):
        stack = [first]  # iterative: a grid may chain many runs (sources are acyclic: _check_sources)
        while stack:
            u = stack[-1]
            todo = [s for s in after[u] if s not in chain]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            chain[u] = tuple(seconds[u][k] + max((chain[s][k] for s in after[u]), default=0.0) for k in range(3))
    longest = tuple(max((c[k] for c in chain.values()), default=0.0) for k in range(3))
    return tuple(max(sum(s[k] for s in seconds) / max(1, jobs), longest[k]) for k in range(3))
