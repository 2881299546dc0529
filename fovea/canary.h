// The canary pick for the native parts (the gateway's front and the worker's front): which target of an alias
// serves one call, also for the gateway's Python (fg_canary_pick). The registry, which has no native part, picks
// with fovea/canary.py; tests/worker/test_binding.py and tests/gateway/test_native_binding.py check the rule.
#pragma once

#include <cstddef>

namespace fovea::canary {

// The index of the target that serves one call, by weight: the alias's whole percentages, so a 0% target is
// never picked while another has weight. With every weight 0 (the weighted targets are not loaded here), any
// target is picked, each as likely. unit: a uniform random number in [0, 1). targets: not empty.
template <class Targets, class WeightOf>
size_t pick(const Targets& targets, WeightOf weight_of, double unit) {
  const size_t n = targets.size();
  double total = 0;
  for (const auto& t : targets)
    if (weight_of(t) > 0) total += double(weight_of(t));
  if (total <= 0) return size_t(unit * double(n)) % n;
  double x = unit * total;
  size_t last = 0;
  for (size_t i = 0; i < n; ++i) {
    double w = double(weight_of(targets[i]));
    if (w <= 0) continue;
    if (x < w) return i;
    x -= w;
    last = i;
  }
  return last;  // unit * total rounded up to total
}

}  // namespace fovea::canary
