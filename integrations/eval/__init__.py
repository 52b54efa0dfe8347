"""Accuracy harness: 16-bit KV against HACK and the KIVI-, CacheGen- and KVQuant-like baselines."""
