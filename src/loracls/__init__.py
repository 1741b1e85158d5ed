"""loracls: fine-tune transformer encoders for text classification with LoRA, under a trainable-parameter budget."""

__version__ = "0.1.0"
