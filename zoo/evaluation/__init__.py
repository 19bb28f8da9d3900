"""Evaluating a language model in context: the harness's scoring, few-shot prompts, tasks on
offline data, and self-consistency."""
