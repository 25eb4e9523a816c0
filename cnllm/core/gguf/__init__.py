"""GGUF: conversion from Hugging Face checkpoints (gguf.GGUFWriter) and quantization (llama.cpp's own quantizer).

Recognising a GGUF file (its magic) lives in :mod:`cnllm.core.files`, below the tokenizers that refuse one."""
