"""Helpers for causal language models, apart from the compression pipeline: text data (:mod:`.data`),
model loading from GGUF or HF folders (:mod:`.hf`), perplexity and generation (:mod:`.evaluate`),
recovery by distillation (:mod:`.recovery`) and the ``blastfx`` command line (:mod:`.cli`)."""
