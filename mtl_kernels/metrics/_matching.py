"""Maximum-cardinality bipartite matching for the edge metric's boundary matching.

matching_sizes(left, right, num_left, num_right, ends): the size of a maximum matching of the
graph with edges (left[i], right[i]), i < ends[k], for each k (nested prefixes: the candidate
pairs of decreasing thresholds). The cpu backend (csrc/cpu/bipartite_matching.cpp) is
Hopcroft-Karp with dead ends dropped in each phase, each prefix starting from the previous
prefix's matching; the reference is scipy.sparse.csgraph.maximum_bipartite_matching on each
prefix, which is exact but can take time exponential in the depth of layered graphs (scipy
issue 26147), as boundary maps of lines make: 5 to 85 s for one threshold of one 480 x 640 image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from .. import _backend

IMPLEMENTED = ("reference", "cpu")


def matching_sizes(left, right, num_left: int, num_right: int, ends, *, backend: str | None = None) -> np.ndarray:
    """int64 [K]: maximum matching sizes of the edge-list prefixes [0, ends[k]) (ends non-decreasing)."""
    left, right, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (left, right, ends))
    if left.shape != right.shape or left.ndim != 1:
        raise ValueError(f"matching_sizes: left and right must be 1-D of one length, got {left.shape}, {right.shape}")
    if ends.ndim != 1 or (ends.size and (ends[0] < 0 or ends[-1] > left.size or np.any(np.diff(ends) < 0))):
        raise ValueError(f"matching_sizes: ends must be non-decreasing in [0, {left.size}]")
    name = _backend.resolve(backend, torch.device("cpu"), "matching_sizes", IMPLEMENTED)
    if name == "cpu":
        op = torch.ops.mtl_kernels.bipartite_matching_sizes
        sizes = op(torch.from_numpy(left), torch.from_numpy(right), num_left, num_right, torch.from_numpy(ends))
        return sizes.numpy()
    out = np.zeros(ends.size, dtype=np.int64)
    for k, n in enumerate(ends):
        if n == 0:
            continue
        graph = csr_matrix((np.ones(n, dtype=np.int8), (left[:n], right[:n])), shape=(num_left, num_right))
        graph.sum_duplicates()
        out[k] = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    return out
