// The fast port's limits for the C++ side (check.cc, front.cc, ort_loop.cc); the C ABI itself, and the
// batch struct, are declared once in api.h.
#pragma once

#include "api.h"

constexpr int kMaxTensors = FV_MAX_TENSORS;
constexpr int kMaxRank = FV_MAX_RANK;
