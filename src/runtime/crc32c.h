// CRC-32C (Castagnoli), as used by TFRecord / TensorBoard event files and for checkpoint checksums.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv4 {

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);  // pass a previous result to continue
// CRC-32C of a whole file, read in chunks. Throws dsv4::Error naming the file when it cannot be read.
uint32_t crc32c_file(const std::string& path);

}  // namespace dsv4
