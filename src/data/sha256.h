// SHA-256 (FIPS 180-4), implemented here so the data pipeline needs no crypto library. Used to fingerprint
// tokenizer.json files: a dataset records the hash of the tokenizer that wrote it and the trainer compares it
// with the model's.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv4::data {

class Sha256 {
 public:
  Sha256() { reset(); }
  void reset();
  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  std::array<uint8_t, 32> digest();  // finishes; call reset() before reusing
  std::string hex_digest();          // lowercase hex of digest()

 private:
  void block(const uint8_t* p);
  std::array<uint32_t, 8> h_{};
  std::array<uint8_t, 64> buf_{};
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(std::string_view data);
// Hash of a file's bytes (streamed); throws dsv4::Error naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace dsv4::data
