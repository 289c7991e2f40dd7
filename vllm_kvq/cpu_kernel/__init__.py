"""Compiled CPU kernels for packed KV blocks (C++, built on first use: ``build.py``).

``ops`` has the attention ops with the torch path's signatures; ``csrc/kvq_cpu.cpp`` the
kernels. The torch path (``vllm_kvq.paged_attention``) stays the reference they are tested
against.
"""
