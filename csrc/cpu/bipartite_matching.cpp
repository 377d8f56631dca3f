// bipartite_matching_sizes on the CPU: maximum-cardinality bipartite matching
// (Hopcroft and Karp 1973) of growing prefixes of one edge list, for the edge
// metric's boundary matching (mtl_kernels/metrics/edge.py). Its reference is
// scipy.sparse.csgraph.maximum_bipartite_matching on each prefix.
//
// Why not scipy alone: its depth-first phase never marks dead ends, so it
// takes time exponential in the depth of layered graphs (scipy issue 26147),
// and boundary maps of lines give such graphs: one 480 x 640 image took 5 to
// 85 s per threshold. Here each phase keeps a current-arc pointer per vertex
// and drops a vertex whose arcs are exhausted, so a phase is O(E).
//
// The prefixes are nested (the edge sets of decreasing thresholds), so each
// one starts from the previous one's matching: it stays a matching when edges
// are added, and only the augmenting paths the new edges open remain to find.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace mtl_kernels {
namespace {

constexpr int64_t kUnmatched = -1;
constexpr int64_t kInf = std::numeric_limits<int64_t>::max();

class Matcher {
 public:
  // Edges (left[i], right[i]); each left vertex's arcs in edge order, so that the
  // arcs of a prefix of the edge list are a prefix of every vertex's arcs.
  Matcher(const int64_t* left, const int64_t* right, int64_t edges, int64_t num_left, int64_t num_right)
      : start_(num_left + 1, 0), arcs_(edges), usable_(num_left, 0), match_left_(num_left, kUnmatched),
        match_right_(num_right, kUnmatched), dist_(num_left), next_(num_left) {
    for (int64_t i = 0; i < edges; ++i) ++start_[left[i] + 1];
    for (int64_t u = 0; u < num_left; ++u) start_[u + 1] += start_[u];
    std::vector<int64_t> fill(start_.begin(), start_.end() - 1);
    for (int64_t i = 0; i < edges; ++i) arcs_[fill[left[i]]++] = right[i];
    left_ = left;
  }

  // Adds edges [added, end) and returns the size of a maximum matching of edges [0, end).
  int64_t grow_to(int64_t end) {
    for (; added_ < end; ++added_) {
      const int64_t u = left_[added_];
      const int64_t v = arcs_[start_[u] + usable_[u]++];
      if (match_left_[u] == kUnmatched && match_right_[v] == kUnmatched) {  // greedy: free to free
        match_left_[u] = v, match_right_[v] = u;
        ++size_;
      }
    }
    while (layer()) {
      for (size_t u = 0; u < next_.size(); ++u) next_[u] = start_[u];
      for (size_t u = 0; u < next_.size(); ++u)
        if (match_left_[u] == kUnmatched && augment(static_cast<int64_t>(u))) ++size_;
    }
    return size_;
  }

 private:
  // Breadth-first layers from the free left vertices over alternating paths;
  // true when some free right vertex is reachable.
  bool layer() {
    std::vector<int64_t> queue;
    for (size_t u = 0; u < dist_.size(); ++u) {
      dist_[u] = match_left_[u] == kUnmatched ? 0 : kInf;
      if (dist_[u] == 0) queue.push_back(static_cast<int64_t>(u));
    }
    bool found = false;
    for (size_t q = 0; q < queue.size(); ++q) {
      const int64_t u = queue[q];
      for (int64_t j = start_[u]; j < start_[u] + usable_[u]; ++j) {
        const int64_t w = match_right_[arcs_[j]];
        if (w == kUnmatched) {
          found = true;
        } else if (dist_[w] == kInf) {
          dist_[w] = dist_[u] + 1;
          queue.push_back(w);
        }
      }
    }
    return found;
  }

  // One augmenting path from free vertex root along the layers, depth first
  // without recursion; a vertex whose arcs run out is a dead end for the phase.
  bool augment(int64_t root) {
    stack_.assign(1, root);
    while (!stack_.empty()) {
      const int64_t u = stack_.back();
      if (next_[u] == start_[u] + usable_[u]) {  // dead end
        dist_[u] = kInf;
        stack_.pop_back();
        if (!stack_.empty()) ++next_[stack_.back()];
        continue;
      }
      const int64_t w = match_right_[arcs_[next_[u]]];
      if (w == kUnmatched) {  // flip the path: every vertex on the stack takes its current arc
        for (const int64_t x : stack_) {
          const int64_t v = arcs_[next_[x]];
          match_left_[x] = v, match_right_[v] = x;
        }
        return true;
      }
      if (dist_[w] != kInf && dist_[w] == dist_[u] + 1)
        stack_.push_back(w);
      else
        ++next_[u];
    }
    return false;
  }

  std::vector<int64_t> start_, arcs_, usable_, match_left_, match_right_, dist_, next_, stack_;
  const int64_t* left_ = nullptr;
  int64_t added_ = 0, size_ = 0;
};

at::Tensor bipartite_matching_sizes_cpu(const at::Tensor& left, const at::Tensor& right, int64_t num_left,
                                        int64_t num_right, const at::Tensor& ends) {
  for (const auto* t : {&left, &right, &ends})
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu(),
                "bipartite_matching_sizes: left, right and ends must be 1-D int64 CPU tensors");
  TORCH_CHECK(left.numel() == right.numel(), "bipartite_matching_sizes: left and right must have one length");
  TORCH_CHECK(num_left >= 0 && num_right >= 0, "bipartite_matching_sizes: vertex counts must be >= 0");
  const at::Tensor l = left.contiguous(), r = right.contiguous(), e = ends.contiguous();
  const int64_t edges = l.numel();
  const int64_t *lp = l.const_data_ptr<int64_t>(), *rp = r.const_data_ptr<int64_t>();
  if (edges > 0) {
    TORCH_CHECK(l.min().item<int64_t>() >= 0 && l.max().item<int64_t>() < num_left,
                "bipartite_matching_sizes: left vertices must be in [0, num_left)");
    TORCH_CHECK(r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < num_right,
                "bipartite_matching_sizes: right vertices must be in [0, num_right)");
  }
  const int64_t* ep = e.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < e.numel(); ++k)
    TORCH_CHECK(0 <= ep[k] && ep[k] <= edges && (k == 0 || ep[k - 1] <= ep[k]),
                "bipartite_matching_sizes: ends must be non-decreasing and in [0, number of edges]");
  at::Tensor sizes = at::empty({e.numel()}, e.options());
  Matcher matcher(lp, rp, edges, num_left, num_right);
  for (int64_t k = 0; k < e.numel(); ++k) sizes.mutable_data_ptr<int64_t>()[k] = matcher.grow_to(ep[k]);
  return sizes;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) { m.impl("bipartite_matching_sizes", &bipartite_matching_sizes_cpu); }

}  // namespace mtl_kernels
