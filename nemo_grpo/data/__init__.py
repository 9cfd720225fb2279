"""Corpus preparation (LibriSQA, CoVoST2, toy), prompt templates and the lhotse dataset yielding PromptBatch."""
