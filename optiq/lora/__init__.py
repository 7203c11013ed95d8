"""LoRA: adapter formats (PEFT and mlx-lm) and mounting on a shared base."""

from .adapters import AdapterSelector, LoRAWeights, MultiLoRALinear, mount, read_adapter, resolve_adapter

__all__ = ["AdapterSelector", "LoRAWeights", "MultiLoRALinear", "mount", "read_adapter", "resolve_adapter"]
