"""Evaluation data: real benchmarks from VLMEvalKit TSV files (and the synthetic suite)."""
