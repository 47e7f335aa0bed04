"""PEFT adapter types of hf_ista, each in PEFT's own tuner layout."""
