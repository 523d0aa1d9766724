"""Training data: the built-in corpus, a byte-level tokenizer, and the step/unit data order."""
