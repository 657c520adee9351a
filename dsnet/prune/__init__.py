"""Static pruning: coupled channel groups, channel scores, permutation, per-group widths (``python -m dsnet.prune``)."""
