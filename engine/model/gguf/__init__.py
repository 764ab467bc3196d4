"""GGUF import: the quantized formats' decoders and the converter to the HF safetensors layout."""
