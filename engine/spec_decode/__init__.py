"""Speculative decoding: the speculator (verify steps) and the draft proposers."""
