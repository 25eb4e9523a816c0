"""Evaluation: perplexity of text files (:mod:`.ppl`), multiple-choice exams such as C-Eval, CMMLU and MMLU (:mod:`.mc`),
preference accuracy (:mod:`.pref`) and long context (:mod:`.passkey`, :mod:`.longbench`), on the one loaded model
of :func:`cnllm.core.backends.load_model`: a Hugging Face directory (optionally with an unmerged LoRA adapter) or a GGUF file."""
