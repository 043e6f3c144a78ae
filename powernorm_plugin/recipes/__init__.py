"""Reproduction recipes: data preparation, training, evaluation and comparison tables.

The shell scripts under ``recipes/`` are thin wrappers around
``python -m powernorm_plugin.recipes`` (see :mod:`.__main__`). The helpers here need no
fairseq (archive verification, text extraction, Moses tokenization through sacremoses,
sentencepiece BPE, BLEU scoring, result tables); only the steps that run fairseq's tools
import it.
"""
