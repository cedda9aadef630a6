"""Retrieval with a trained GRACE: the identifier trie, constrained beam search, the retriever.

:mod:`grace.retrieval.retriever` is the entry point; the trie, index and fused decode steps
serve its beam search.
"""
