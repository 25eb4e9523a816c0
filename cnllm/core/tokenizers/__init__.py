"""Tokenizer training, merging, export to Hugging Face format, and inspection."""
