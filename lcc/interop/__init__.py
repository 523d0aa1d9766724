"""Hugging Face interoperability: specs from transformers configs, and weights in and out (docs/interop.md)."""
