"""fastdetr from its source tree, with no install: what benchmarks/gpu_suite.sh puts on PYTHONPATH.

The lent GPU machines have torch and Triton but no fastdetr install, and no
network for `pip install -e .` (its dependencies include pycocotools) nor,
necessarily, setuptools for `--no-deps --no-build-isolation`. The repository
root on sys.path makes `fastdetr` importable, but `fastdetr.kernels` is the
top-level `kernels/` folder (setup.py's package_dir), which no path entry
finds. Python imports this module at start-up when its folder is on
PYTHONPATH (the `site` module's sitecustomize hook), in every process the
suite starts, subprocesses and compile workers included; it puts a finder
for exactly that one name in front of sys.meta_path -- what setuptools'
editable install does -- and then runs the sitecustomize this one shadows,
if the interpreter has one.
"""
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "kernels")


class _SourceTreeKernels:
    """Finds `fastdetr.kernels` in the repository's kernels/ folder; every other name is left to the others."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "fastdetr.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(_KERNELS, "__init__.py"),
                                                      submodule_search_locations=[_KERNELS])


def _run_shadowed_sitecustomize():
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:   # as `site` treats a failing sitecustomize: a warning, never a failed start
        print(f"benchmarks/source_tree: the interpreter's own sitecustomize failed: {error!r}", file=sys.stderr)


if os.path.isfile(os.path.join(_KERNELS, "__init__.py")):
    sys.meta_path.insert(0, _SourceTreeKernels)
_run_shadowed_sitecustomize()
