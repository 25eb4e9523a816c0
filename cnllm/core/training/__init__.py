"""The training core shared by ``cnllm pt`` and ``cnllm sft``: data, Trainer + PEFT setup, callbacks."""
