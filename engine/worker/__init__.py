"""Executing steps on the device: the model runner and its KV pool, the persistent decode
inputs, CUDA graphs, and KV-cache sizing."""
