"""Disaggregated prefill/decode over hack-kv: KV as wire frames through the KV store or a transport."""
