"""The steps of benchmarks/gpu_first_contact.py (see its docstring)."""
