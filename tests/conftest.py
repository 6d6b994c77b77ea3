import os

import pytest

# offline by design: every test must pass with the hub unreachable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# one BLAS thread per process: tests and nbval kernels share 2 cores, and oversubscribed tiny matmuls are 50x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")


# `make test` runs the suite on two pytest-xdist workers. The scheduler below keeps each test module on one worker (its
# module-scoped fixtures, and tests that read another test's output) and every notebook on one worker, in order:
# nbval needs a notebook's cells in one kernel, and the notebooks share the repo's runs/ci/. (xdist's own
# `--dist loadgroup` does not group under pytest 9: it renames nodeids through an attribute pytest no longer reads.)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "notebooks" if path.endswith(".ipynb") else path

    return NotebooksTogether(config, log)


def pytest_collection_modifyitems(items):
    """The notebooks, then the modules holding slow tests, then the rest (with --no-loadscope-reorder, xdist hands
    the groups out in this order), so no long group starts last; the order within a module is kept."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.suffix != ".ipynb", item.path not in slow))
