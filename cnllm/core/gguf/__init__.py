"""GGUF: conversion from Hugging Face checkpoints (gguf.GGUFWriter) and quantization (llama.cpp's own quantizer)."""
