"""LoRA adapters on the engine: the slots that hold them (slots) and a batch's computation (batch)."""
from .batch import FORMS, GROUPS, GroupLora, LoraBatch, LoraDeltas, mixed_forms
from .slots import LoraSlots, StackedLora

__all__ = ["FORMS", "GROUPS", "GroupLora", "LoraBatch", "LoraDeltas", "LoraSlots", "StackedLora", "mixed_forms"]
