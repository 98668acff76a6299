#!/bin/sh
echo "bazel coverage is not supported in this offline build (stand-in @remote_coverage_tools)." >&2
exit 1
