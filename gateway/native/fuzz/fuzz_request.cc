// libFuzzer target: the front's checks of a ModelInferRequest (check_request in ../request.h, the gateway's only
// copy of its rules) on arbitrary bytes. The bytes are split into two slices at a point the first byte picks, as
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
  Checked c = check_request(slices, 100, 64);
  // A valid request names a valid model, is charged for at least 0 images, and over the limit only past it.
  if (c.rules.empty() && (!valid_name(c.head.model) || c.images < 0)) __builtin_trap();
  if (!c.over_limit.empty() && (!c.rules.empty() || c.images <= 64)) __builtin_trap();
  if (c.rules.size() >= FG_MESSAGE_BYTES) __builtin_trap();  // every message fits fg_check's
  // The same bytes in one slice read the same.
  std::vector<grpc::Slice> whole;
  if (size > 1) whole.emplace_back(data + 1, size - 1);
  Checked w = check_request(whole, 100, 64);
  if (w.rules != c.rules || w.images != c.images || w.over_limit != c.over_limit) __builtin_trap();
  // One input tensor, as the REST gateway checks it.
  check::Input in;
  uint64_t elements = 0;
  Reader r(whole);
  if (check::input(r, &in) && check::check_tensor(in, &elements).empty() && elements > (uint64_t(1) << 40))
    __builtin_trap();
  return 0;
}
