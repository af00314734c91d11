"""One script per hot path, ours beside the anchors in the same run; run from the repository root
as modules (`python -m benchmarks.vq_kernel`). common.py holds the timing, the tables and the cases
the scripts share."""
