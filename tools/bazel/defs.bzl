"""py_test wrapper: runs pytest on one test file with the .venv toolchain."""

def pytest_test(name, src, deps = [], data = [], size = "medium", **kwargs):
    """One Bazel test per pytest file.

    Args:
      name: target name.
      src: the pytest file (test_*.py) in this package.
      deps: py_library targets the test imports.
      data: other files the test reads (conftest.py, helpers' data, ...).
      size: Bazel test size; "medium" means a "moderate" (300 s) timeout.
      **kwargs: passed on to py_test.
    """
    runner = "//tools/bazel:pytest_main.py"
    native.py_test(
        name = name,
        srcs = [runner, src],
        main = runner,
        args = ["$(location %s)" % src],
        deps = deps + ["//tools/bazel:pytest_main"],
        data = data + ["//:pyproject"],
        size = size,
        python_version = "PY3",
        srcs_version = "PY3",
        **kwargs
    )

def package_library(name, **kwargs):
    """The Python sources of one installed package folder, plus its non-Python files
    (shipped with the package, so tests see them too)."""
    native.py_library(
        name = name,
        srcs = native.glob(["**/*.py"]),
        data = native.glob(
            ["**"],
            exclude = [
                "**/*.py",
                "**/*.pyc",
                "**/__pycache__/**",
                "BUILD.bazel",
            ],
        ),
        visibility = ["//visibility:public"],
        **kwargs
    )
