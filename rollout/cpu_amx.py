"""CPU engines in bfloat16: let this process use Intel AMX tiles before vLLM's kernels do.

On Linux an x86 process must ask the kernel for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``) before its first tile instruction; without it that instruction raises SIGILL.
oneDNN asks for itself, but vLLM's CPU attention kernel (``cpu_attention_with_kv_cache``) picks its AMX path
for bfloat16 on a CPU that lists ``amx_bf16`` and does not ask: a bfloat16 engine then dies on its first
request. torch exposes the request as ``torch._C._cpu._init_amx`` (the permission holds for the whole
process, every thread of it); on a CPU without AMX it does nothing and returns False.
"""

from __future__ import annotations


def allow_amx() -> bool:
    """Ask the kernel for AMX tile state for this process; True if granted (False: no AMX, or no such API)."""
    import torch

    request = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(request()) if request is not None else False
