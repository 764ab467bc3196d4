"""Kernel developer tools, never imported at run time: ``python -m kernels.tools.report`` (the
offline sm_80/sm_90 compile gate: registers, shared memory, spills, approximate divisions)."""
