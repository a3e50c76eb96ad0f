#!/usr/bin/env bash
# The main job, end to end, on the embedded default model. Writes under ./demo/.
set -euo pipefail
echo "tracekit demo: to be filled in as the verbs land" >&2
tracekit --version
