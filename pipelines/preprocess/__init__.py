"""Preprocessing: MTG-Jamendo audio -> DAC tokens + Flan-T5 embeddings (Parquet), and the synthetic corpus.

Plain steps (jamendo, audio, filters, captions, selection, tokens) are testable without Ray; graph.py wires
them and the pretrained parts into the Ray Data pipeline; corpus/ writes a small corpus in the Jamendo layout.
"""
