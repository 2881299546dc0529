// The fast port's C ABI (front.cc), as used by worker/fast_port.py through ctypes and by ort_loop.cc.
#pragma once

#include <cstdint>

constexpr int kMaxTensors = 8;
constexpr int kMaxRank = 8;

extern "C" {

struct fv_batch {
  int64_t id;
  int32_t samples;
  int32_t calls;
  int32_t ninputs;
  int32_t expired;    // calls dropped before compute: deadline passed
  int32_t cancelled;  // calls dropped before compute: the caller cancelled
  int32_t queued;     // calls still queued once this batch was taken
  const void* data[kMaxTensors];
  int64_t nbytes[kMaxTensors];
  int32_t rank[kMaxTensors];
  int64_t dims[kMaxTensors][kMaxRank];
};

int fv_next_batch(void* fp, int slot, int timeout_ms, fv_batch* out, double* waits_s);
int fv_complete(void* fp, int64_t id, int64_t compute_ns, int noutputs, const char** dtypes, const void** data,
                const int32_t* ranks, const int64_t* dims);
int fv_fail(void* fp, int64_t id, int code, const char* message);
}
