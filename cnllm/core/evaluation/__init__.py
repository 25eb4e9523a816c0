"""Evaluation: perplexity of text files (:mod:`.ppl`) and multiple-choice exams such as C-Eval, CMMLU and MMLU (:mod:`.mc`),
on a Hugging Face directory (optionally with an unmerged LoRA adapter) or a GGUF file (:mod:`.models`)."""
