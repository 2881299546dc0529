// libFuzzer target: Classify's wire format in the gateway's native front (../classify.h) on arbitrary bytes:
// reading a ClassifyRequest and each image's header, then reading the same bytes as a worker's answer. What it
// promises: no read outside the input, a size only when both sides are positive, and an answer it accepts
// parses back as a message it could have written (field by field, in bounds).
//
// Build and run: scripts/fuzz.sh (every gateway/native/fuzz/fuzz_*.cc).
#include "../classify.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string body(reinterpret_cast<const char*>(data), size);
  classify::Request req;
  if (classify::read_request(body, &req)) {
    for (const auto& img : req.images) {
      bool inside = img.data >= body.data() && img.data + img.size <= body.data() + body.size();
      if (img.data != nullptr && !inside) __builtin_trap();  // an image without data has none
      uint64_t w = 0, h = 0;
      if (classify::image_dims(img.data, img.size, &w, &h) && (w == 0 || h == 0)) __builtin_trap();
    }
    std::string fwd = classify::infer_request(req.model, 1, "input", "logits", req.images, 3);
    classify::Wire check(fwd);
    while (!check.done()) {
      uint64_t tag;
      if (!check.varint(&tag) || !check.skip(uint32_t(tag & 7))) __builtin_trap();  // its own output parses
    }
  }
  uint64_t w = 0, h = 0;
  if (classify::image_dims(body.data(), body.size(), &w, &h) && (w == 0 || h == 0)) __builtin_trap();
  std::string out;
  std::vector<std::string> ids = {"a", "", "c"};
  if (classify::classify_response(body, "model", 1, ids, &out)) {
    classify::Wire check(out);
    while (!check.done()) {
      uint64_t tag;
      if (!check.varint(&tag) || !check.skip(uint32_t(tag & 7))) __builtin_trap();
    }
  }
  return 0;
}
