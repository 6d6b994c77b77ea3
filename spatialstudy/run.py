"""Run the study: every numbered notebook in order with papermill, one parameter profile.

    python -m spatialstudy.run --profile smoke            # what `make study` does
    python -m spatialstudy.run --profile ci --only 01_data
    python -m spatialstudy.run --list
    torchrun --nproc-per-node 4 -m spatialstudy.run --profile full --only 02_sft --direct   # data-parallel arms

A stage is a numbered notebook (notebooks/NN_name.ipynb, picked up automatically) or a package entry point listed in
PY_STAGES (for work with no figures of its own). Parameters come from params/<profile>/<name>.yaml; the `ci` tier uses
the notebooks' own defaults. The reserved key `budget_s` is the stage's wall-time budget, logged, not passed on.
Every stage's parameter file is validated (keys, types, values, budget) before the first stage starts, so a typo in
the last stage's file stops the run at once, not after hours of earlier stages.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import yaml

from spatialstudy import runs

NOTEBOOK_RE = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
# stage name -> (the stage it runs after, "module:function(profile, params)")
PY_STAGES = {"baseline": ("01_data", "spatialstudy.methods.baseline:main")}
# notebooks whose package entry point trains arms: `--direct` calls it in this process instead of papermill, so that
# `torchrun` / `accelerate launch` can start it on several processes (the Trainer's data parallelism; the main
# process evaluates and writes the run). Run the notebook afterwards for its figures: it finds every arm done.
DIRECT = {"02_sft": "spatialstudy.methods.sft:main", "04_distill": "spatialstudy.methods.distill:main",
          "05_grayscale": "spatialstudy.methods.grayscale:main"}
KERNEL = "python3"  # the kernel of the running interpreter: papermill run from the venv stays in the venv


class StageFailed(RuntimeError):
    pass


class ParamsError(ValueError):
    """A parameter file that fails validation; the message names the file and the key."""


def notebooks_dir() -> Path:
    return runs.root() / "notebooks"


def stages() -> list[str]:
    """Numbered notebooks in order, with the python stages slotted in after the stage they need."""
    names = sorted(p.stem for p in notebooks_dir().glob("*.ipynb") if NOTEBOOK_RE.match(p.name))
    for name, (after, _) in PY_STAGES.items():
        if after in names and _entry_exists(name):
            names.insert(names.index(after) + 1, name)
    return names


def _entry_exists(name: str) -> bool:
    module = PY_STAGES[name][1].split(":")[0]
    return importlib.util.find_spec(module) is not None


def load_params(name: str, profile: str) -> tuple[dict, float | None]:
    """The stage's parameters for this profile (validated against its config) and its time budget.
    Raises ParamsError (bad YAML, type, value or budget) or KeyError (unknown key), naming the file."""
    path = runs.root() / "params" / profile / f"{name}.yaml"
    where = str(path.relative_to(runs.root()))
    params = {}
    if path.exists():
        params = _read_yaml(path, where)
    elif profile != "ci":
        print(f"[run] note: {where} not found; {name} runs with its ci defaults")
    budget = _check_budget(params.pop("budget_s", None), where)
    params["profile"] = profile
    from spatialstudy.configs import CONFIGS

    if name in CONFIGS:
        CONFIGS[name].check_keys(params, where=where)
        _check_values(CONFIGS[name], params, where)
    return params, budget


def _read_yaml(path: Path, where: str) -> dict:
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ParamsError(f"{where}: must be a mapping of parameter names to values, got {str(params)[:80]!r}")
    return params


def _check_budget(budget, where: str) -> float | None:
    """budget_s: a positive number of seconds, or absent/null for no budget."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:  # NaN fails too
        raise ParamsError(f"{where}: budget_s must be a positive number of seconds, got {budget!r}")
    return budget


def _check_values(config_cls, params: dict, where: str) -> None:
    """Build the stage's config from the file's values (defaults for the rest): types and value checks run now,
    in the runner, instead of in the kernel after the earlier stages have run."""
    try:
        config_cls(**params)
    except (TypeError, ValueError) as err:
        raise ParamsError(f"{where}: {err}") from None


def validate_profile(names: list[str], profile: str) -> dict[str, tuple[dict, float | None]]:
    """Load and validate every stage's parameter file; the first bad one raises (ParamsError or KeyError)."""
    return {name: load_params(name, profile) for name in names}


def run_notebook(name: str, profile: str, params: dict) -> Path:
    """Execute notebooks/<name>.ipynb into reports/<profile>/<name>.ipynb; a failure names the cell."""
    import papermill as pm

    out = runs.root() / "reports" / profile / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # relative paths: papermill stores them in the executed copy, which is committed under reports/
        pm.execute_notebook(os.path.relpath(notebooks_dir() / f"{name}.ipynb"), os.path.relpath(out),
                            parameters=params, kernel_name=KERNEL, cwd=str(notebooks_dir()), progress_bar=False)
    except pm.PapermillExecutionError as err:
        raise StageFailed(f"notebook {name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                          f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {out}") from None
    return out


def run_python_stage(name: str, profile: str, params: dict, entry: str | None = None) -> None:
    module, func = (entry or PY_STAGES[name][1]).split(":")
    try:
        getattr(importlib.import_module(module), func)(profile, params)
    except Exception as err:
        raise StageFailed(f"stage {name} failed: {type(err).__name__}: {err}") from err


def run_stage(name: str, profile: str, loaded: tuple[dict, float | None] | None = None, direct: bool = False) -> float:
    """Run one stage (with its already validated `loaded` (params, budget), if given); returns its wall time.
    `direct`: a DIRECT stage's entry point in this process, not its notebook."""
    params, budget = loaded or load_params(name, profile)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    if name in PY_STAGES or direct:
        run_python_stage(name, profile, params, DIRECT[name] if direct else None)
    else:
        run_notebook(name, profile, params)
    wall = time.perf_counter() - start
    verdict = "" if budget is None else (" within budget" if wall <= budget else " OVER BUDGET")
    print(f"[run] {name}: {wall:.0f} s" + (f" (budget {budget:.0f} s){verdict}" if budget else ""), flush=True)
    return wall


def record_timing(profile: str, stage: str, seconds: float) -> None:
    """Merge one stage's wall time into reports/<profile>/timings.json as soon as the stage ends, so a later stage
    (06_results' report) reads the times of those before it and a failure keeps the times of those that finished.
    One writer under torchrun / accelerate launch."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = runs.root() / "reports" / profile / "timings.json"
    runs.write_json(path, {**(runs.read_json(path) if path.exists() else {}), stage: seconds})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=runs.PROFILES)
    ap.add_argument("--only", action="append", help="run only this stage (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the stages and exit")
    ap.add_argument("--direct", action="store_true", help=f"with --only {' / '.join(DIRECT)}: the stage's entry "
                    "point in this process (for torchrun / accelerate launch), not its notebook")
    args = ap.parse_args(argv)
    names = stages()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = set(args.only or []) - set(names)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; stages are {names}")
    if args.direct and not (args.only and set(args.only) <= set(DIRECT)):
        ap.error(f"--direct needs --only with stages among {sorted(DIRECT)} (the ones that train arms)")
    try:
        plan = validate_profile(names, args.profile)
    except (ParamsError, KeyError) as err:
        print(f"[run] STOPPED before the first stage: {err.args[0]}", file=sys.stderr)
        return 2
    timings = {}
    for name in args.only or names:
        try:
            timings[name] = round(run_stage(name, args.profile, plan[name], args.direct), 1)
        except StageFailed as err:
            print(f"[run] STOPPED: {err}", file=sys.stderr)
            return 1
        record_timing(args.profile, name, timings[name])
    print(f"[run] done: {len(timings)} stage(s), {sum(timings.values()):.0f} s; reports in reports/{args.profile}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
