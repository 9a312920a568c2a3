"""Per-tensor random generators: identical masks whatever the order, thread or device.

Each (seed, model index, tensor name) gets its own CPU ``torch.Generator`` seeded from a hash, so
a DARE mask does not depend on which tensors were processed before it (mergekit's single global
seed does), and CPU and CUDA runs agree because masks are always drawn on the CPU.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, model_index: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model_index}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def tensor_generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, model_index, tensor_name))
    return gen
