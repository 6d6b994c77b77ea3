"""Run directories, atomic writes, validated configs and seeds: the files notebooks pass to each other.

Every stage writes runs/<profile>/<name>/{config.json, metrics.json}; later stages read earlier ones only through
`require_run`, so methods never import each other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, get_type_hints

PROFILES = ("ci", "smoke", "full", "full-repro")
# what torchrun / accelerate launch set for each process (besides TORCHELASTIC_*)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def root() -> Path:
    """The project root (holds pyproject.toml); SPATIALSTUDY_ROOT overrides it."""
    if os.environ.get("SPATIALSTUDY_ROOT"):
        return Path(os.environ["SPATIALSTUDY_ROOT"]).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    for cand in [Path.cwd(), *Path.cwd().parents]:  # installed non-editable: find the checkout from the cwd
        if (cand / "pyproject.toml").exists() and (cand / "notebooks").is_dir():
            return cand
    return Path.cwd()


def resolve(path: Path | str) -> Path:
    """A user-given path: absolute as is, relative to the project root (notebooks run with notebooks/ as cwd)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else root() / path


def run_dir(profile: str, name: str, create: bool = True) -> Path:
    """runs/<profile>/<name>, created unless `create` is False."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    path = root() / "runs" / profile / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """runs/cache/<kind>: shared by every profile (e.g. pretrained bases keyed by a hash)."""
    path = root() / "runs" / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(path: Path | str):
    """Hold an exclusive lock (fcntl.flock on the sidecar <path>.lock) while building a cached artefact, so two
    processes asking for the same one (two notebooks, parallel test workers) build it once: the second waits, then
    finds it built. Blocking, unlike the predictions writer's lock, because waiting is the right answer here."""
    lp = Path(f"{path}.lock")
    lp.parent.mkdir(parents=True, exist_ok=True)
    with open(lp, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {path} (lock {lp})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600: give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def write_json(path: Path | str, obj: Any) -> Path:
    """Atomic, pretty, key-sorted JSON (dataclasses, Paths and numpy scalars allowed)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path | str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_hash(obj: Any, length: int = 12) -> str:
    """A stable short hash of a json-able object (the cache key of runs and pretrained bases)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def keyed_dir(path: Path | str, identity: dict, who: str = "run", marker: str = "arm.json") -> Path:
    """`path`, emptied first when its marker file names another identity (changed settings or data), so a
    checkpoint or adapter of other settings is never resumed or reused."""
    import shutil

    path, key = Path(path), config_hash(identity)
    marker = path / marker
    if marker.exists() and read_json(marker).get("hash") != key:
        print(f"[{who}] {path} holds a run with other settings: starting afresh")
        shutil.rmtree(path)
    write_json(marker, {"hash": key, **identity})
    return path


def save_run(profile: str, name: str, config: Any, metrics: dict) -> Path:
    """Write config.json then metrics.json; metrics.json last, so its presence marks a finished run."""
    out = run_dir(profile, name)
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    return out


def is_done(profile: str, name: str) -> bool:
    return (run_dir(profile, name, create=False) / "metrics.json").exists()


def require_run(profile: str, name: str) -> Path:
    """The run dir of an earlier stage; at the ci tier a missing one is built, elsewhere the error names the command."""
    if is_done(profile, name):
        return run_dir(profile, name)
    command = [sys.executable, "-m", "spatialstudy.run", "--profile", profile, "--only", name]
    if profile == "ci":
        # the runner's command line, not an import of it: the runner sits above every layer, this module below.
        # It runs as one process of its own: a launcher's rank variables would make it wait for ranks that never come
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
        if subprocess.run(command, env=env).returncode == 0 and is_done(profile, name):
            return run_dir(profile, name)
        raise RuntimeError(f"building the missing ci run {name!r} failed (see above): {' '.join(command[1:])}")
    raise FileNotFoundError(
        f"run {name!r} of profile {profile!r} is missing (no runs/{profile}/{name}/metrics.json). "
        f"Produce it with: python {' '.join(command[1:])}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


# ---------------------------------------------------------------- notebook configs
@dataclasses.dataclass
class StageConfig:
    """Base of every notebook's config: built from the parameters cell, type-checked, typos fail loudly."""

    profile: str = "ci"
    seed: int = 0

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])

    @classmethod
    def from_params(cls, namespace: dict, **overrides):
        """Pick this config's fields out of a notebook's globals(); a missing one is an error, not a default."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in namespace and n not in overrides]
        if missing:
            raise NameError(f"{cls.__name__}: the parameters cell does not define {missing}")
        return cls(**{n: overrides.get(n, namespace.get(n)) for n in names})

    @classmethod
    def for_profile(cls, profile: str, params: dict, stage: str):
        """The config a stage's main() runs: params as params/<profile>/<stage>.yaml gives them (no profile key),
        unknown keys rejected before any value is checked."""
        params = {**params, "profile": profile}
        cls.check_keys(params, where=f"params/{profile}/{stage}.yaml")
        return cls(**params)

    @classmethod
    def check_keys(cls, params: dict, where: str = "parameters") -> None:
        """Reject unknown keys (papermill only warns about them), naming the closest field."""
        import difflib

        names = [f.name for f in dataclasses.fields(cls)]
        for key in params:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise KeyError(f"{where}: unknown parameter {key!r} for {cls.__name__}{hint}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Light runtime type check for the literal types parameters cells use."""
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        allowed = typing.get_args(hint)
    else:
        allowed = (origin or hint,)
    allowed = tuple(type(None) if a is None else (typing.get_origin(a) or a) for a in allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return  # an int literal where a float is expected is fine (lr = 1 would be odd, but valid)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise TypeError(f"parameter {name!r} must be {hint}, got {type(value).__name__} {value!r}")
