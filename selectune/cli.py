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

`train`, `probe`, `eval` and `export` run under `hydra.main` (run dirs, multirun, --cfg, completion); `cat` and
`validate` use Hydra's compose API, so they write nothing. Overrides are checked before Hydra runs:
an unknown recipe / group option gets close-name suggestions and a wrong-typed value names its key.
"""

from __future__ import annotations

import os
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
  ls        list the recipes
  cat       print a resolved recipe: selectune cat glue/mrpc_full [overrides]
  validate  build it, train nothing: selectune validate glue/mrpc_full [overrides]

bash completion:  eval "$(selectune -sc install=bash)"
"""
COMMANDS = ("train", "probe", "eval", "export", "report", "ls", "cat", "validate")
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

    @hydra.main(version_base="1.3", config_path="pkg://selectune.conf", config_name=config_name)
    def run(cfg) -> None:
        from selectune.commands import environment_offline

        environment_offline(bool(cfg.get("online", False)))
        try:
            body(cfg)
        except (SelectuneError, KeyboardInterrupt) as err:
            if isinstance(err, KeyboardInterrupt):
                err = SelectuneError("interrupted; continue with the same out_dir and trainer.resume=true")
            fail(err, bool(cfg.get("debug", False)) or is_debug([]))

    return run


def _train(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from selectune.commands import train
    from selectune.distributed import finish

    hydra_cfg = HydraConfig.get()
    explicit = any(o.split("=", 1)[0].lstrip("+") == "out_dir" for o in hydra_cfg.overrides.task)
    train(cfg, Path(hydra_cfg.runtime.output_dir), explicit_out_dir=explicit or hydra_cfg.mode.name == "MULTIRUN")
    if hydra_cfg.mode.name != "MULTIRUN":  # a torchrun sweep keeps its process group for the next job
        finish()


def _eval(cfg) -> None:
    from selectune.commands import evaluate_delta

    evaluate_delta(cfg.run, cfg.get("task"), cfg.batch_size, cfg.device)


def _probe(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from selectune.commands import remove_run_dir
    from selectune.probe import run_probe

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_probe(cfg, run_dir)
    except SelectuneError:
        if not (run_dir / "summary.json").exists():
            remove_run_dir(run_dir)
        raise


def _export(cfg) -> None:
    from selectune.export import export

    export(cfg.run, cfg.out, cfg.dtype, cfg.force, cfg.format)


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def _precheck(config_name: str, args: list[str]) -> None:
    """Compose and type-check a single run before Hydra creates its run dir."""
    from selectune.commands import RunSpec
    from selectune.config import check_group_overrides, compose

    overrides = _overrides(args)
    if any(a in ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--info", "--hydra-help") for a in args):
        check_group_overrides(overrides)  # a sweep is not composed here; its group values still are checked
        return
    RunSpec.from_config(compose(config_name, [o for o in overrides if not o.lstrip("+~").startswith("hydra")]))


def _recipe_args(args: list[str]) -> list[str]:
    """`cat glue/mrpc_full x=1` -> `recipe=glue/mrpc_full x=1`."""
    return [a if "=" in a or a.startswith("-") else f"recipe={a}" for a in args]


def completion(args: list[str]) -> None:
    """Bash completion: subcommands and `recipe=` values here, the rest by the subcommand's Hydra app."""
    from selectune.config import list_recipes

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
        if sub in ("cat", "validate") and "=" not in current:
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
    if not any(a == "online=true" for a in args):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args[:1] in (["-sc"], ["--shell-completion"]):
        completion(args[1:])
        return
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(SelectuneError(f"unknown command '{command}' (commands: {', '.join(COMMANDS)})"), debug)
    try:
        if command == "ls":
            from selectune.config import print_recipes

            print_recipes()
        elif command == "report":
            from selectune.report import parse_pair, report

            folders = [Path(a) for a in rest if not a.startswith(("out=", "pair="))]
            out = next((Path(a[4:]) for a in rest if a.startswith("out=")), None)
            pairs = [parse_pair(a[5:]) for a in rest if a.startswith("pair=")]
            if not folders:
                raise SelectuneError("which runs? selectune report <run dirs or a multirun dir> [out=<dir>]")
            report(folders, out, pairs)
        elif command in ("cat", "validate"):
            from omegaconf import OmegaConf

            from selectune.config import compose

            rest = _recipe_args(rest)
            if not any(a.startswith("recipe=") for a in rest):
                raise SelectuneError(f"which recipe? selectune {command} <recipe> (selectune ls lists them)")
            cfg = compose("train", rest)
            from selectune.commands import RunSpec

            RunSpec.from_config(cfg)
            if command == "cat":
                print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            else:
                from selectune.commands import validate

                validate(cfg)
        else:
            if command in ("train", "probe"):
                _precheck(command, rest)
            sys.argv = [f"selectune {command}", *rest]
            body = {"train": _train, "probe": _probe, "eval": _eval, "export": _export}[command]
            _hydra_entry(HYDRA_COMMANDS[command], body)()
    except SelectuneError as err:
        fail(err, debug)


if __name__ == "__main__":
    main()
