"""Main of every Bazel py_test here: runs pytest on the test file(s) given as arguments.

Bazel starts it with the runfiles tree as the working directory (a mirror of the
repository root holding only the declared files). There the package folders are
not yet in their installed places (pallas_kernels/ is `sere_jax.kernels`, ...), so
this maps them the way pyproject.toml's [tool.setuptools.package-dir] does,
pointing at the runfiles copies rather than at the editable install's source tree.
"""

import importlib.abc
import importlib.util
import os
import sys
import tomllib


class _PackageDirFinder(importlib.abc.MetaPathFinder):
    """Finds the packages named in pyproject.toml's package-dir inside the runfiles."""

    def __init__(self, package_dirs):
        self._package_dirs = package_dirs

    def find_spec(self, fullname, path=None, target=None):
        folder = self._package_dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"),
            submodule_search_locations=[folder])


def _install_package_dirs(root):
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    package_dir = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    package_dirs = {name: os.path.join(root, folder) for name, folder in package_dir.items()
                    if os.path.isfile(os.path.join(root, folder, "__init__.py"))}
    sys.meta_path.insert(0, _PackageDirFinder(package_dirs))


def main(argv):
    # Bazel: $TEST_SRCDIR/$TEST_WORKSPACE is the runfiles mirror of the repository root.
    root = os.path.join(os.environ.get("TEST_SRCDIR", ""), os.environ.get("TEST_WORKSPACE", ""))
    root = root if os.path.isfile(os.path.join(root, "pyproject.toml")) else os.getcwd()
    os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)  # `tests` is importable, as with `python -m pytest`
    sys.dont_write_bytecode = True  # keep the runfiles tree free of __pycache__
    _install_package_dirs(root)

    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, ".hypothesis"))
    args = ["-p", "no:cacheprovider", *argv]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])

    import pytest

    code = pytest.main(args)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest collected no tests from", *argv)
        return 0
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
