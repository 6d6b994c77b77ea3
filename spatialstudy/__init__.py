"""spatialstudy: spatial reasoning in Qwen2.5-VL under resource constraints (SFT, ICL, distillation, colour)."""
__version__ = "0.1.0"
