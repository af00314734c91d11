"""One script per hot path, ours beside the anchors in the same run. Run from the repository root
as `python benchmarks/vq_kernel.py` or `python -m benchmarks.vq_kernel` (the same). common.py holds
the timing and the tables the scripts share."""
