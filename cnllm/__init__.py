"""cnllm: adapt LLaMA-family models to Chinese, from vocabulary to served model."""

__version__ = "0.1.0"
