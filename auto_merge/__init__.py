"""auto-merge: search merge recipes for fine-tuned LLMs and write plain Hugging Face checkpoints."""

__version__ = "0.1.0"
