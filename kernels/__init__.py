"""Triton kernels for the KVQ packed formats (store, paged decode, prefill)."""
