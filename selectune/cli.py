"""`selectune` command line: parse, dispatch, and turn user errors into one line.

    selectune train recipe=glue/mrpc_full [overrides] [-m] [--cfg job]   Hydra-composed training run
    selectune probe recipe=glue/sst2_spt_lora [probe.batches=16]         sensitivity maps, no training
    selectune eval run=<run dir or delta file> [task=glue/<name>]        score a stored delta
    selectune export run=<run dir or delta file> out=<dir> [dtype=...]   merge into a plain HF model
        [format=peft]                                                    (or: a peft adapter folder)
    selectune report <run dirs or a multirun dir> [out=<dir>] [pair=A:B] table + plots; A − B on common seeds
    selectune ls                                                         list recipes
    selectune cat <recipe> [overrides]                                   print a resolved recipe
    selectune validate <recipe> [overrides]                              build everything, train nothing
    selectune sweep <recipe> [trainer.lr=a,b,c ...] [study=<dir>]        choose values on the validation split

`train`, `probe`, `eval` and `export` run under `hydra.main` (run dirs, multirun, --cfg, completion); `cat` and
`validate` use Hydra's compose API, so they write nothing. Overrides are checked before Hydra runs:
an unknown recipe / group option gets close-name suggestions and a wrong-typed value names its key.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from selectune.errors import SelectuneError

USAGE = """usage: selectune <command> [recipe=... | <recipe>] [key=value ...]

commands:
  train     train a recipe:          selectune train recipe=glue/mrpc_full [trainer.lr=3e-5] [-m]
  eval      score a stored delta:    selectune eval run=<run dir or delta file> [task=glue/rte]
  export    merge into the base:     selectune export run=<run dir or delta file> out=<dir> [dtype=bfloat16]
  probe     sensitivity maps:        selectune probe recipe=glue/sst2_spt_lora [probe.batches=16]
  report    compare runs:            selectune report runs/multirun/<time> [more dirs] [out=<dir>] [pair=sdiff:full]
  ls        list the recipes:        selectune ls [mrpc] [lora] [glue/*_sdiff]
  predict   label a file with a delta: selectune predict run=<run dir> file=<csv|tsv|jsonl> out=<preds.csv>
  cp        copy a recipe to edit:   selectune cp glue/mrpc_lora conf/recipe/mine/mrpc_lora.yaml
  cat       print a resolved recipe: selectune cat glue/mrpc_full [overrides]
  validate  build it, train nothing: selectune validate glue/mrpc_full [overrides]
  sweep     choose on validation:    selectune sweep glue/rte_lora [trainer.lr=2e-4,1e-3] [study=<dir>] [write=true]

bash completion:  eval "$(selectune -sc install=bash)"
"""
COMMANDS = ("train", "probe", "eval", "export", "report", "ls", "cat", "validate", "sweep", "cp", "predict")
HYDRA_COMMANDS = {"train": "train", "probe": "probe", "eval": "eval", "export": "export"}


def fail(err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    print(f"selectune: error: {err}", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", 1))


def is_debug(args: list[str]) -> bool:
    return "debug=true" in args or os.environ.get("SELECTUNE_DEBUG") == "1"


def _hydra_entry(config_name: str, body: Callable) -> Callable[[], None]:
    import hydra

    from selectune.recipes import register

    # the recipes composed from a preset and a task that the command line (or the line being completed) names
    register(sys.argv[1:] + os.environ.get("COMP_LINE", "").split())

    @hydra.main(version_base="1.3", config_path="pkg://selectune.conf", config_name=config_name)
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from selectune.config import set_network

        set_network(bool(cfg.get("online", False)))
        debug = bool(cfg.get("debug", False)) or is_debug([])
        from safetensors import SafetensorError

        try:
            try:
                body(cfg)
            except SafetensorError as err:  # a write no save path turned into its OSError (runfs.save_safetensors)
                from selectune.runfs import safetensors_why

                raise SelectuneError(f"could not write a tensor file: {safetensors_why(err)}") from None
        except (SelectuneError, KeyboardInterrupt, OSError) as err:
            if isinstance(err, KeyboardInterrupt):
                fail(SelectuneError("interrupted; continue with the same out_dir and trainer.resume=true"), debug)
            elif isinstance(err, OSError):
                if debug:
                    raise
                err = SelectuneError(f"{err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
            hydra_cfg = HydraConfig.get()
            if hydra_cfg.mode.name == "MULTIRUN" and not debug:
                # one failed job must not stop the sweep: the rest run, then main() lists the failures
                job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
                FAILED_JOBS.append(f"{job}: {err}")
                return
            fail(err, debug)

    return run


FAILED_JOBS: list[str] = []  # one line per failed job of a multirun, reported once the sweep has ended
SWEEP_DIRS: list[Path] = []  # the folder a multirun's jobs write under (Hydra's hydra.sweep.dir, resolved)
STAGE_VARIABLE = "SELECTUNE_STAGE_DIR"  # train.yaml's hydra.run.dir: where Hydra writes before a run proceeds


def _train(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from selectune.commands import train
    from selectune.distributed import finish
    from selectune.runfs import drop_staging

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    explicit = any(o.split("=", 1)[0].lstrip("+") == "out_dir" for o in hydra_cfg.overrides.task)
    output = Path(hydra_cfg.runtime.output_dir)
    stage = os.environ.get(STAGE_VARIABLE)
    staged = not multirun and stage is not None and output == Path(stage)
    run_dir = Path(str(cfg.out_dir)) if staged else output
    # a job dir Hydra has just made for this sweep job holds nothing else: it is this job's to remove on failure
    owned = multirun and hydra_made(output, hydra_cfg.job.name)
    if multirun:
        SWEEP_DIRS.append(Path(hydra_cfg.sweep.dir))
    try:
        train(cfg, run_dir, explicit_out_dir=explicit or multirun, stage=output if staged else None, owned=owned)
    finally:
        if staged and output.exists():
            drop_staging(output)
    if not multirun:  # a torchrun sweep keeps its process group for the next job
        finish()


def _eval(cfg) -> None:
    from selectune.commands import evaluate_delta
    from selectune.runs import resolve_run

    require(cfg, "eval", "run", "run=<run dir or delta file>")
    evaluate_delta(resolve_run(cfg.run, "eval"), cfg.get("task"), cfg.batch_size, cfg.device,
                   max_examples=cfg.get("max_eval_examples"), force=bool(cfg.get("force", False)))


def _probe(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from selectune.probe import run_probe
    from selectune.runfs import drop_staging

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    output = Path(hydra_cfg.runtime.output_dir)
    stage = os.environ.get(STAGE_VARIABLE)
    staged = not multirun and stage is not None and output == Path(stage)
    run_dir = Path(str(cfg.out_dir)) if staged else output
    owned = multirun and hydra_made(output, hydra_cfg.job.name)  # never remove a folder that held anything before
    if multirun:
        SWEEP_DIRS.append(Path(hydra_cfg.sweep.dir))
    try:
        run_probe(cfg, run_dir, stage=output if staged else None, owned=owned)
    finally:
        if staged and output.exists():
            drop_staging(output)


def hydra_made(folder: Path, job_name: str) -> bool:
    """Whether `folder` holds only what Hydra has just written for this job, so a failure may remove it."""
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", f"{job_name}.log"}


def _export(cfg) -> None:
    from selectune.export import export

    require(cfg, "export", "run", "run=<run dir or delta file> out=<dir>")
    require(cfg, "export", "out", "run=<run dir or delta file> out=<dir>")
    from selectune.runs import resolve_run

    export(resolve_run(cfg.run, "export"), cfg.out, cfg.dtype, cfg.force, cfg.format)


def require(cfg, command: str, key: str, usage: str) -> None:
    """A mandatory argument (`run: ???` in the command's config) named in one line when it is missing."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, key):
        raise SelectuneError(f"{command} needs {key}=: selectune {command} {usage}")


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def _precheck(config_name: str, args: list[str]) -> None:
    """Compose and type-check a single run before Hydra creates its run dir."""
    from selectune.commands import RunSpec
    from selectune.config import check_group_overrides, compose, resolve_all

    overrides = [o for o in _overrides(args)
                 if not o.lstrip("+~").startswith("hydra") or o.lstrip("+~").startswith("hydra.searchpath=")]
    if any(a in ("--cfg", "-c", "--help", "-h", "--info", "--hydra-help") for a in args):
        check_group_overrides(overrides)
        return
    for job in _sweep_samples(overrides) if any(a in ("-m", "--multirun") for a in args) else [overrides]:
        cfg = compose(config_name, job)
        resolve_all(cfg)  # an unknown resolver or a loop in the recipe: one line now, not a traceback in the run
        if config_name not in ("train", "probe"):
            continue
        RunSpec.from_config(cfg)
        if config_name == "probe" and (Path(str(cfg.out_dir)) / "summary.json").exists():
            # before Hydra writes its .hydra/ there: a finished probe's folder stays as it is
            raise SelectuneError(f"{cfg.out_dir} holds a finished probe (summary.json); choose another out_dir")


def _sweep_samples(overrides: list[str]) -> list[list[str]]:
    """Override lists that together use every value of every sweep (`a=1,2 b=x,y` -> [a=1 b=x], [a=2 b=x],
    [a=1 b=y]): a typo in any value fails before Hydra makes the sweep folder, without composing the
    whole product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        from selectune.config import first_line

        raise SelectuneError(first_line(str(err))) from None
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [text.partition("=")[2]]
              for o, text in zip(parsed, overrides, strict=True)]
    keys = [text.partition("=")[0] for text in overrides]
    if not all(re.fullmatch(r"[\w./:+-]*", v[0]) for v in values if len(v) > 1):
        return [[k for k in overrides if "," not in k]]  # quoting this sweep back is Hydra's job: plain keys only
    samples = [[f"{k}={v[0]}" for k, v in zip(keys, values, strict=True)]]
    for i, options in enumerate(values):
        for option in options[1:]:
            if not re.fullmatch(r"[\w./:+-]*", option):  # a quoted or nested value: left to Hydra's own parsing
                continue
            sample = list(samples[0])
            sample[i] = f"{keys[i]}={option}"
            samples.append(sample)
    return samples


VALUE_OPTIONS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                 "-cd", "--info", "-i", "--experimental-rerun")  # Hydra options whose next word is their value


def _positional_recipe(command: str, args: list[str]) -> list[str]:
    """`train glue/mrpc_lora x=1` -> `train recipe=glue/mrpc_lora x=1`, as cat and validate take it: a bare word
    naming a recipe (family/name) that is not an option's value."""
    out: list[str] = []
    for i, arg in enumerate(args):
        value_of_option = i > 0 and args[i - 1] in VALUE_OPTIONS
        if "=" not in arg and "/" in arg and not arg.startswith("-") and not value_of_option:
            if any(a.startswith("recipe=") for a in args) or any(o.startswith("recipe=") for o in out):
                raise SelectuneError(f"two recipes: {arg} and recipe=...; {command} takes one")
            arg = f"recipe={arg}"
        out.append(arg)
    return out


def _recipe_args(args: list[str]) -> list[str]:
    """`cat glue/mrpc_full x=1` -> `recipe=glue/mrpc_full x=1`."""
    return [a if "=" in a or a.startswith("-") else f"recipe={a}" for a in args]


# Hydra's flags that take the next word as their value (`--cfg job`), and for the optional ones its choices
def completion(args: list[str]) -> None:
    """Bash completion: subcommands and `recipe=` values here, the rest by the subcommand's Hydra app."""
    from selectune.recipes import list_recipes

    sys.argv = ["selectune", "-sc", *args]  # Hydra names the completed program after argv[0]
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if any(a.startswith("query") for a in args):
        sub = words[1] if len(words) > 1 else ""
        if sub not in COMMANDS or (len(words) == 2 and not line.endswith(" ")):
            prefix = "" if len(words) < 2 else sub
            print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
            return
        current = "" if line.endswith(" ") else words[-1]
        if sub in ("cat", "validate", "cp") and "=" not in current:
            print(" ".join(r for r in list_recipes() if r.startswith(current)))
            return
        if current.startswith("recipe="):
            print(" ".join(f"recipe={r}" for r in list_recipes() if f"recipe={r}".startswith(current)))
            return
        if sub not in HYDRA_COMMANDS:
            return
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
        _hydra_entry(HYDRA_COMMANDS[sub], lambda cfg: None)()
        return
    _hydra_entry("train", lambda cfg: None)()  # -sc install=bash / uninstall=bash


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `selectune ls | head` ends quietly
    args = list(sys.argv[1:] if argv is None else argv)
    debug = is_debug(args)
    from selectune.config import set_network

    set_network(any(a == "online=true" for a in args))  # before huggingface_hub is imported: it reads the env once
    if args[:1] in (["-sc"], ["--shell-completion"]):
        completion(args[1:])
        return
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if args[0] in ("-V", "--version"):
        from selectune import __version__

        print(f"selectune {__version__}")
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(SelectuneError(f"unknown command '{command}' (commands: {', '.join(COMMANDS)})"), debug)
    if any(a in ("-h", "--help", "help") for a in rest):  # this command's usage; Hydra's commands add theirs
        print(command_usage(command), end="")
        if command not in HYDRA_COMMANDS:
            return
        print()
        rest = ["--help" if a == "help" else a for a in rest]
    try:
        LOCAL_COMMANDS.get(command, _hydra_command)(command, rest)
    except SelectuneError as err:
        fail(err, debug)


def _ls(command: str, rest: list[str]) -> None:
    from selectune.recipes import list_recipes, matching, print_recipes

    if not rest:
        print_recipes()
        return
    names = matching(list_recipes(), rest)
    if not names:
        raise SelectuneError(f"no recipe matches {' '.join(rest)} (a word in the name, or a glob: glue/*_lora); "
                             f"selectune ls lists them all")
    print_recipes(names)


def _predict(command: str, rest: list[str]) -> None:
    from selectune.config import set_network
    from selectune.predict import parse, predict_file

    args = parse(rest)
    set_network(False)
    predict_file(args)


def _cp(command: str, rest: list[str]) -> None:
    """`selectune cp <recipe> <folder>/recipe/<name>.yaml`: an editable copy, checked to compose before it is
    kept, and the command line that runs it."""
    from selectune.config import compose
    from selectune.recipes import list_recipes, recipe_text
    from selectune.runfs import check_folder

    usage = "selectune cp <recipe> <folder>/recipe/<name>.yaml (e.g. conf/recipe/mine/mrpc_lora.yaml)"
    if len(rest) != 2 or "=" in rest[0]:
        raise SelectuneError(f"cp takes a recipe and a file: {usage}")
    name, dest = rest[0], Path(rest[1])
    if name not in list_recipes():
        from selectune.config import check_choice

        check_choice("recipe", name)
    parts = dest.parts
    if dest.suffix != ".yaml" or "recipe" not in parts[:-1]:
        raise SelectuneError(f"cp writes a recipe where Hydra finds it: a .yaml file below a folder named recipe/: "
                             f"{usage}")
    at = len(parts) - 1 - parts[::-1].index("recipe")  # the innermost recipe/ folder
    folder = Path(*parts[:at]).resolve() if at else Path.cwd().resolve()
    new_name = str(Path(*parts[at + 1:]).with_suffix(""))
    if dest.exists() or dest.is_symlink():
        raise SelectuneError(f"{dest} already exists; choose another file (or remove it first)")
    from selectune.config import shipped_file

    if shipped_file(new_name):
        raise SelectuneError(f"{new_name} is a shipped recipe's name, which is read before your folder: name the "
                             f"copy otherwise (e.g. {Path(*parts[:at + 1], 'mine', Path(new_name).name)}.yaml)")
    check_folder(dest.parent, "cp")
    searchpath = f"hydra.searchpath=[file://{folder}]"
    made = [p for p in reversed([dest.parent, *dest.parent.parents]) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.write_text(recipe_text(name, new_name))
        from selectune.commands import RunSpec

        RunSpec.from_config(compose("train", [searchpath, f"recipe={new_name}"]))  # usable as written
    except BaseException:
        dest.unlink(missing_ok=True)
        for path in reversed(made):
            path.rmdir()
        raise
    print(f"wrote {dest} (a copy of {name}); edit it, then:")
    print(f"  selectune validate {new_name} '{searchpath}'")
    print(f"  selectune train recipe={new_name} '{searchpath}'")


def _report(command: str, rest: list[str]) -> None:
    from selectune.report import parse_pair, report

    folders = [Path(a) for a in rest if not a.startswith(("out=", "pair="))]
    out = next((Path(a[4:]) for a in rest if a.startswith("out=")), None)
    if out is not None:
        from selectune.runfs import check_folder

        check_folder(out, "out")
    pairs = [parse_pair(a[5:]) for a in rest if a.startswith("pair=")]
    if not folders:
        raise SelectuneError("which runs? selectune report <run dirs or a multirun dir> [out=<dir>]")
    report(folders, out, pairs)


def _compose_recipe(command: str, rest: list[str]):
    """`cat` and `validate`: the recipe composed and checked as `train` would, with nothing written."""
    from selectune.commands import RunSpec
    from selectune.config import compose

    rest = _recipe_args(rest)
    if not any(a.startswith("recipe=") for a in rest):
        raise SelectuneError(f"which recipe? selectune {command} <recipe> (selectune ls lists them)")
    cfg = compose("train", rest)
    RunSpec.from_config(cfg)
    return cfg


def _cat(command: str, rest: list[str]) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_compose_recipe(command, rest), resolve=True), end="")


def _validate(command: str, rest: list[str]) -> None:
    from selectune.commands import validate
    from selectune.config import set_network

    cfg = _compose_recipe(command, rest)
    set_network(bool(cfg.get("online", False)))  # as train does: a recipe may say online: true itself
    validate(cfg)


def _sweep(command: str, rest: list[str]) -> None:
    from selectune.sweep import cost, open_study, parse, run, table

    plan = parse(rest)
    if plan.plan_only:
        print(cost(plan))
        return
    if plan.table_only:
        print(table(plan, open_study(plan, create=False)))
        return
    run(plan)


def _hydra_command(command: str, rest: list[str]) -> None:
    rest = output_overrides(command, rest)
    if command in ("train", "probe"):
        rest = _positional_recipe(command, rest)  # `selectune train glue/rte_lora`, as cat and validate take it
        informational = any(a in ("--cfg", "-c", "--help", "-h", "--info", "--hydra-help") for a in rest)
        keys = {a.partition("=")[0].lstrip("+~") for a in _overrides(rest)}
        if not informational and not keys & {"recipe", "method"}:  # not a 10-minute full fine-tune by default
            raise SelectuneError(f"which recipe? selectune {command} recipe=<recipe> [key=value ...] "
                                 f"(selectune ls lists them)")
    _precheck(command, rest)
    sys.argv = [f"selectune {command}", *quiet_ranks(os.environ), *rest]
    run_hydra(command, HYDRA_BODIES[command], rest)


def quiet_ranks(env: dict[str, str] | os._Environ) -> list[str]:
    """Under torchrun only rank 0 speaks: Hydra's own lines ("Launching 3 jobs locally", each job's overrides) and
    its job log (train.log) would otherwise come once per process."""
    if env.get("RANK", "0") == "0":
        return []
    return ["hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]


# `hydra.*` overrides that leave where Hydra writes as selectune set it (a sweep's folder stays the user's to name)
HYDRA_KEPT = ("hydra.searchpath", "hydra.sweep.dir", "hydra.launcher.", "hydra.sweeper.", "hydra.verbose",
              "hydra.job.env_set.")


def output_overrides(command: str, rest: list[str]) -> list[str]:
    """Hydra's output settings belong to selectune: a run writes only into its out_dir, and only once every
    check has passed. `hydra.run.dir=X` of a single train or probe means `out_dir=X`; any other override that
    moves Hydra's files (`hydra.output_subdir`, `hydra.sweep.subdir`, `hydra.job.chdir`, `hydra.run.dir` of a
    sweep, eval or export, ...) is refused before anything is written."""
    multirun = any(a in ("-m", "--multirun") for a in rest)
    out_dirs = [a.partition("=")[2] for a in _overrides(rest) if a.partition("=")[0].lstrip("+~") == "out_dir"]
    mapped: list[str] = []
    for arg in rest:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or not key.startswith("hydra.") or key.startswith(HYDRA_KEPT):
            mapped.append(arg)
            continue
        if key == "hydra.run.dir" and command in ("train", "probe") and not multirun:
            if any(d != value for d in out_dirs):
                raise SelectuneError(f"{arg} and out_dir={out_dirs[0]} name two run folders; give out_dir= alone")
            mapped.append(f"out_dir={value}")
            continue
        where = "out_dir=<folder>" if command in ("train", "probe") else "the command's own arguments"
        if multirun:
            where += " (a sweep: hydra.sweep.dir=<folder>)"
        raise SelectuneError(f"{key} moves where Hydra writes, which selectune decides; use {where}")
    return mapped


# what each command runs: the Hydra apps get their config from Hydra, the others parse their own arguments
HYDRA_BODIES: dict[str, Callable] = {"train": _train, "probe": _probe, "eval": _eval, "export": _export}
LOCAL_COMMANDS: dict[str, Callable[[str, list[str]], None]] = {
    "ls": _ls, "report": _report, "cat": _cat, "validate": _validate, "sweep": _sweep, "cp": _cp,
    "predict": _predict}


def run_hydra(command: str, body: Callable, rest: list[str]) -> None:
    """Run a Hydra command. A single training run has Hydra write (`.hydra/`, `train.log`) into a fresh staging
    folder, moved into out_dir only once the run proceeds; a sweep's failed jobs are listed at its end."""

    from selectune import runfs

    multirun = any(a in ("-m", "--multirun") for a in rest)
    informational = any(a in ("--cfg", "-c", "--help", "-h", "--info", "--hydra-help") for a in rest)
    os.environ.pop(STAGE_VARIABLE, None)
    if command in ("train", "probe") and not multirun:
        os.environ[STAGE_VARIABLE] = str(runfs.new_staging())
    kept = runfs.SweepRecord(_sweep_dir(rest)) if multirun and not informational else None
    FAILED_JOBS.clear()
    SWEEP_DIRS.clear()
    runfs.PROCEEDED.clear()
    try:
        _hydra_entry(HYDRA_COMMANDS[command], body)()
    finally:
        stage = os.environ.pop(STAGE_VARIABLE, None)
        if stage is not None:
            runfs.drop_staging(Path(stage))
        if kept is not None and not runfs.PROCEEDED and kept.restore(SWEEP_DIRS[0] if SWEEP_DIRS else None):
            from selectune.commands import remove_run_dir  # no job ran: the sweep folder is left as it was

            remove_run_dir(SWEEP_DIRS[0] if SWEEP_DIRS else Path("."))
    if FAILED_JOBS:
        for line in FAILED_JOBS:
            print(f"selectune: error: {line}", file=sys.stderr)
        sys.exit(SelectuneError.exit_code)


def _sweep_dir(rest: list[str]) -> Path | None:
    """The folder a multirun writes into, when the command line names it (`hydra.sweep.dir=`); the default
    is a new timestamped folder, which `SweepRecord` sees as absent."""
    for arg in _overrides(rest):
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "hydra.sweep.dir":
            return Path(value)
    return None


def command_usage(command: str) -> str:
    """`selectune <command> --help` for the commands Hydra does not parse: that command's line of USAGE."""
    line = next(line for line in USAGE.splitlines() if line.strip().startswith(command + " "))
    what, _, example = line.strip()[len(command):].strip().partition(":")
    return f"usage: {example.strip() or 'selectune ' + command}\n\n{command}: {what.strip()}\n"


if __name__ == "__main__":
    main()
