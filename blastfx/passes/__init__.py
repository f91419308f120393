"""FX passes over a captured model: find linear call sites (analyze) and swap in BLAST (substitute)."""
