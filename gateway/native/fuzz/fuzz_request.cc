// libFuzzer target: the fast port's reading of a ModelInferRequest (scan_request, valid_request in
// ../front.cc) on arbitrary bytes. The bytes are split into two slices at a point the first byte picks, as
// gRPC may hand a message over in pieces, so every read also crosses a slice boundary somewhere.
//
// Build and run (scripts/fuzz.sh builds every gateway/native/fuzz/fuzz_*.cc this way):
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined fuzz_request.cc \
//     $(pkg-config --cflags --libs grpc++ absl_synchronization) -lcrypto -o fuzz_request
//   ./fuzz_request corpus/fuzz_request -max_total_time=60
#include "../front.cc"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t cut = 1 + data[0] % size;  // the message is data[1..size), split at cut
  std::vector<grpc::Slice> slices;
  if (cut > 1) slices.emplace_back(data + 1, cut - 1);
  if (size > cut) slices.emplace_back(data + cut, size - cut);
  Head head = scan_request(slices, 64);
  bool valid = valid_request(slices, 100);
  // What valid_request accepts has a model name and at least one input, as scan_request needs.
  if (valid && head.ok && head.model.empty()) __builtin_trap();
  return 0;
}
