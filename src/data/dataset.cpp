#include "data/dataset.h"

#include <fcntl.h>
#include <hdf5.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>

#include "runtime/error.h"

namespace dsv4::data {
namespace {

// ---- HDF5 error handling: no automatic stack printing inside our calls; failures throw with the innermost
// HDF5 message. ------------------------------------------------------------------------------------------
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

herr_t walk_cb(unsigned n, const H5E_error2_t* err, void* out) {
  auto* s = static_cast<std::string*>(out);
  if (err && err->desc && *err->desc) *s = err->desc;  // keep the innermost description
  (void)n;
  return 0;
}

std::string hdf5_message() {
  std::string s;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &s);
  H5Eclear2(H5E_DEFAULT);
  return s.empty() ? "unknown HDF5 error" : s;
}

template <typename T>
T h5(T rc, const std::string& path, const char* what) {
  if (rc < 0) DSV4_FAIL("{}: {} failed: {}", path, what, hdf5_message());
  return rc;
}

struct Hid {  // closes an HDF5 handle with the right function
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Hid() = default;
  Hid(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  Hid(Hid&& o) noexcept : id(o.id), close(o.close) { o.id = -1; }
  Hid& operator=(Hid&& o) noexcept {
    reset();
    id = o.id;
    close = o.close;
    o.id = -1;
    return *this;
  }
  ~Hid() { reset(); }
  void reset() {
    if (id >= 0 && close) close(id);
    id = -1;
  }
  operator hid_t() const { return id; }
};

// ---- temporary-file registry for signal cleanup (async-signal-safe: fixed buffers, unlink only) ---------
constexpr int kTempSlots = 16;
char g_temp_paths[kTempSlots][4096];
std::atomic<bool> g_temp_used[kTempSlots];

int register_temp(const std::string& path) {
  if (path.size() >= sizeof(g_temp_paths[0])) return -1;
  for (int i = 0; i < kTempSlots; ++i) {
    bool expected = false;
    if (g_temp_used[i].compare_exchange_strong(expected, true)) {
      std::memcpy(g_temp_paths[i], path.c_str(), path.size() + 1);
      return i;
    }
  }
  return -1;
}
void unregister_temp(int slot) {
  if (slot >= 0) g_temp_used[slot].store(false);
}

void cleanup_handler(int sig) {
  for (int i = 0; i < kTempSlots; ++i)
    if (g_temp_used[i].load()) unlink(g_temp_paths[i]);
  signal(sig, SIG_DFL);
  raise(sig);
}

void write_attr_i64(hid_t loc, const char* name, int64_t v, const std::string& path) {
  Hid space(h5(H5Screate(H5S_SCALAR), path, "H5Screate"), H5Sclose);
  Hid attr(h5(H5Acreate2(loc, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), path, name), H5Aclose);
  h5(H5Awrite(attr, H5T_NATIVE_INT64, &v), path, name);
}

// Variable-length UTF-8 strings (h5py reads them as str).
void write_attr_str(hid_t loc, const char* name, const std::string& v, const std::string& path) {
  Hid type(h5(H5Tcopy(H5T_C_S1), path, "H5Tcopy"), H5Tclose);
  h5(H5Tset_size(type, H5T_VARIABLE), path, "H5Tset_size");
  h5(H5Tset_cset(type, H5T_CSET_UTF8), path, "H5Tset_cset");
  Hid space(h5(H5Screate(H5S_SCALAR), path, "H5Screate"), H5Sclose);
  Hid attr(h5(H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT), path, name), H5Aclose);
  const char* p = v.c_str();
  h5(H5Awrite(attr, type, &p), path, name);
}

bool has_attr(hid_t loc, const char* name) { return H5Aexists(loc, name) > 0; }

int64_t read_attr_i64(hid_t loc, const char* name, const std::string& path) {
  DSV4_CHECK(has_attr(loc, name), "{}: missing attribute {} (not a dsv4-prep dataset?)", path, name);
  Hid attr(h5(H5Aopen(loc, name, H5P_DEFAULT), path, name), H5Aclose);
  Hid type(h5(H5Aget_type(attr), path, name), H5Tclose);
  DSV4_CHECK(H5Tget_class(type) == H5T_INTEGER, "{}: attribute {} must be an integer", path, name);
  int64_t v = 0;
  h5(H5Aread(attr, H5T_NATIVE_INT64, &v), path, name);
  return v;
}

std::string read_attr_str(hid_t loc, const char* name, const std::string& path) {
  DSV4_CHECK(has_attr(loc, name), "{}: missing attribute {} (not a dsv4-prep dataset?)", path, name);
  Hid attr(h5(H5Aopen(loc, name, H5P_DEFAULT), path, name), H5Aclose);
  Hid type(h5(H5Aget_type(attr), path, name), H5Tclose);
  DSV4_CHECK(H5Tget_class(type) == H5T_STRING, "{}: attribute {} must be a string", path, name);
  if (H5Tis_variable_str(type) > 0) {
    Hid mem(h5(H5Tcopy(H5T_C_S1), path, "H5Tcopy"), H5Tclose);
    h5(H5Tset_size(mem, H5T_VARIABLE), path, "H5Tset_size");
    h5(H5Tset_cset(mem, H5Tget_cset(type)), path, "H5Tset_cset");
    char* p = nullptr;
    h5(H5Aread(attr, mem, &p), path, name);
    std::string s = p ? p : "";
    H5free_memory(p);
    return s;
  }
  const size_t n = H5Tget_size(type);
  std::string s(n, '\0');
  h5(H5Aread(attr, type, s.data()), path, name);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

Hid create_extendible(hid_t file, const char* name, hid_t type, int64_t chunk, int level, const std::string& path) {
  hsize_t dims[1] = {0}, maxdims[1] = {H5S_UNLIMITED}, chunk_dims[1] = {static_cast<hsize_t>(chunk)};
  Hid space(h5(H5Screate_simple(1, dims, maxdims), path, "H5Screate_simple"), H5Sclose);
  Hid dcpl(h5(H5Pcreate(H5P_DATASET_CREATE), path, "H5Pcreate"), H5Pclose);
  h5(H5Pset_chunk(dcpl, 1, chunk_dims), path, "H5Pset_chunk");
  if (level > 0) {
    h5(H5Pset_shuffle(dcpl), path, "H5Pset_shuffle");
    h5(H5Pset_deflate(dcpl, static_cast<unsigned>(level)), path, "H5Pset_deflate");
  }
  return Hid(h5(H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), path, name), H5Dclose);
}

void append(hid_t ds, int64_t& size, hid_t memtype, const void* data, int64_t n, const std::string& path,
            const char* name) {
  if (n == 0) return;
  hsize_t new_size[1] = {static_cast<hsize_t>(size + n)};
  h5(H5Dset_extent(ds, new_size), path, name);
  Hid fspace(h5(H5Dget_space(ds), path, name), H5Sclose);
  hsize_t start[1] = {static_cast<hsize_t>(size)}, count[1] = {static_cast<hsize_t>(n)};
  h5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr), path, name);
  Hid mspace(h5(H5Screate_simple(1, count, nullptr), path, name), H5Sclose);
  h5(H5Dwrite(ds, memtype, mspace, fspace, H5P_DEFAULT, data), path, name);
  size += n;
}

void fsync_path(const std::string& p, bool directory) {
  const int fd = open(p.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}
}  // namespace

// =========================================================================================================
struct DatasetWriter::Impl {
  Options o;
  std::string tmp;
  int slot = -1;
  Hid file, dtok, doff, dmask;
  std::vector<int32_t> tok_buf;
  std::vector<uint8_t> mask_buf;
  std::vector<int64_t> off_buf;
  int64_t tok_written = 0, mask_written = 0, off_written = 0;
  int64_t n_tokens = 0, n_docs = 0, records = 0, skipped = 0;
  bool done = false;

  void flush(bool all) {
    const int64_t chunk = o.chunk_tokens;
    const int64_t n = all ? static_cast<int64_t>(tok_buf.size())
                          : static_cast<int64_t>(tok_buf.size()) / chunk * chunk;  // whole chunks only
    append(dtok, tok_written, H5T_NATIVE_INT32, tok_buf.data(), n, tmp, "/tokens");
    tok_buf.erase(tok_buf.begin(), tok_buf.begin() + n);
    if (o.with_loss_mask) {
      append(dmask, mask_written, H5T_NATIVE_UINT8, mask_buf.data(), n, tmp, "/loss_mask");
      mask_buf.erase(mask_buf.begin(), mask_buf.begin() + n);
    }
    const int64_t m = all ? static_cast<int64_t>(off_buf.size())
                          : static_cast<int64_t>(off_buf.size()) / chunk * chunk;
    append(doff, off_written, H5T_NATIVE_INT64, off_buf.data(), m, tmp, "/doc_offsets");
    off_buf.erase(off_buf.begin(), off_buf.begin() + m);
  }

  void remove_temp() {
    dtok.reset();
    doff.reset();
    dmask.reset();
    file.reset();
    if (!tmp.empty()) std::remove(tmp.c_str());
    unregister_temp(slot);
    slot = -1;
  }
};

DatasetWriter::DatasetWriter(Options opts) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = std::move(opts);
  QuietHdf5 quiet;
  DSV4_CHECK(!m.o.path.empty(), "dataset writer: empty output path");
  DSV4_CHECK(m.o.vocab_size > 0, "{}: vocab_size must be positive", m.o.path);
  DSV4_CHECK(m.o.chunk_tokens > 0, "{}: chunk_tokens must be positive", m.o.path);
  DSV4_CHECK(m.o.compression >= 0 && m.o.compression <= 9, "{}: compression level {} not in 0..9", m.o.path,
             m.o.compression);
  if (m.o.compression > 0 && H5Zfilter_avail(H5Z_FILTER_DEFLATE) <= 0) m.o.compression = 0;
  const std::filesystem::path out(m.o.path);
  const std::filesystem::path dir = out.has_parent_path() ? out.parent_path() : std::filesystem::path(".");
  DSV4_CHECK(std::filesystem::is_directory(dir), "{}: output directory {} does not exist", m.o.path, dir.string());
  m.tmp = (dir / ("." + out.filename().string() + ".tmp." + std::to_string(getpid()))).string();
  m.slot = register_temp(m.tmp);
  m.file = Hid(h5(H5Fcreate(m.tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), m.tmp, "creating the file"),
               H5Fclose);
  m.dtok = create_extendible(m.file, "/tokens", H5T_STD_I32LE, m.o.chunk_tokens, m.o.compression, m.tmp);
  m.doff = create_extendible(m.file, "/doc_offsets", H5T_STD_I64LE, m.o.chunk_tokens, m.o.compression, m.tmp);
  if (m.o.with_loss_mask)
    m.dmask = create_extendible(m.file, "/loss_mask", H5T_STD_U8LE, m.o.chunk_tokens, m.o.compression, m.tmp);
  m.off_buf.push_back(0);
}

DatasetWriter::~DatasetWriter() {
  if (impl_ && !impl_->done) {
    QuietHdf5 quiet;
    impl_->remove_temp();
  }
}

void DatasetWriter::add(std::span<const int32_t> ids, std::span<const uint8_t> mask) {
  Impl& m = *impl_;
  DSV4_CHECK(!m.done, "{}: add() after commit/abort", m.o.path);
  if (m.o.with_loss_mask)
    DSV4_CHECK(mask.size() == ids.size(), "{}: document {} has {} tokens but a loss mask of {}", m.o.path, m.n_docs,
               ids.size(), mask.size());
  else
    DSV4_CHECK(mask.empty(), "{}: a loss mask was given to a dataset written without one", m.o.path);
  for (size_t i = 0; i < ids.size(); ++i)
    DSV4_CHECK(ids[i] >= 0 && ids[i] < m.o.vocab_size, "{}: document {} token {} has id {} outside [0, {})", m.o.path,
               m.n_docs, i, ids[i], m.o.vocab_size);
  m.tok_buf.insert(m.tok_buf.end(), ids.begin(), ids.end());
  if (m.o.with_loss_mask) m.mask_buf.insert(m.mask_buf.end(), mask.begin(), mask.end());
  m.n_tokens += static_cast<int64_t>(ids.size());
  ++m.n_docs;
  m.off_buf.push_back(m.n_tokens);
  if (static_cast<int64_t>(m.tok_buf.size()) >= 8 * m.o.chunk_tokens ||
      static_cast<int64_t>(m.off_buf.size()) >= 8 * m.o.chunk_tokens) {
    QuietHdf5 quiet;
    m.flush(false);
  }
}

void DatasetWriter::set_record_counts(int64_t records, int64_t skipped) {
  impl_->records = records;
  impl_->skipped = skipped;
}
int64_t DatasetWriter::num_documents() const { return impl_->n_docs; }
int64_t DatasetWriter::num_tokens() const { return impl_->n_tokens; }
const std::string& DatasetWriter::temp_path() const { return impl_->tmp; }

DatasetInfo DatasetWriter::commit() {
  Impl& m = *impl_;
  DSV4_CHECK(!m.done, "{}: commit() twice", m.o.path);
  QuietHdf5 quiet;
  m.flush(true);
  const std::string& p = m.tmp;
  DatasetInfo info;
  info.path = m.o.path;
  info.format = m.o.format;
  info.vocab_size = m.o.vocab_size;
  info.tokenizer_sha256 = m.o.tokenizer_sha256;
  info.bos_id = m.o.bos_id;
  info.eos_id = m.o.eos_id;
  info.source_file = m.o.source_file;
  info.num_documents = m.n_docs;
  info.num_tokens = m.n_tokens;
  info.num_records = m.records;
  info.num_skipped = m.skipped;
  info.split = m.o.split;
  info.created_by = m.o.created_by;
  info.has_loss_mask = m.o.with_loss_mask;
  write_attr_i64(m.file, "dsv4_format_version", kDatasetFormatVersion, p);
  write_attr_str(m.file, "format", info.format, p);
  write_attr_i64(m.file, "vocab_size", info.vocab_size, p);
  write_attr_str(m.file, "tokenizer_sha256", info.tokenizer_sha256, p);
  write_attr_i64(m.file, "bos_id", info.bos_id, p);
  write_attr_i64(m.file, "eos_id", info.eos_id, p);
  write_attr_str(m.file, "source_file", info.source_file, p);
  write_attr_i64(m.file, "num_documents", info.num_documents, p);
  write_attr_i64(m.file, "num_tokens", info.num_tokens, p);
  write_attr_i64(m.file, "num_records", info.num_records, p);
  write_attr_i64(m.file, "num_skipped", info.num_skipped, p);
  write_attr_str(m.file, "split", info.split, p);
  write_attr_str(m.file, "created_by", info.created_by, p);
  m.dtok.reset();
  m.doff.reset();
  m.dmask.reset();
  h5(H5Fflush(m.file, H5F_SCOPE_GLOBAL), p, "H5Fflush");
  const hid_t f = m.file.id;
  m.file.id = -1;
  h5(H5Fclose(f), p, "closing the file");
  fsync_path(m.tmp, false);
  std::error_code ec;
  std::filesystem::rename(m.tmp, m.o.path, ec);
  DSV4_CHECK(!ec, "{}: cannot rename {} over it: {}", m.o.path, m.tmp, ec.message());
  unregister_temp(m.slot);
  m.slot = -1;
  const std::filesystem::path out(m.o.path);
  fsync_path(out.has_parent_path() ? out.parent_path().string() : ".", true);
  m.done = true;
  return info;
}

void DatasetWriter::abort() {
  if (impl_->done) return;
  QuietHdf5 quiet;
  impl_->remove_temp();
  impl_->done = true;
}

// =========================================================================================================
struct DatasetReader::Impl {
  DatasetInfo info;
  std::vector<int64_t> offsets;
  Hid file, dtok, dmask;
  std::vector<int32_t> tokens_mem;
  std::vector<uint8_t> mask_mem;
  bool preloaded = false;

  void read(hid_t ds, hid_t memtype, int64_t begin, int64_t end, void* out, const char* name) const {
    const std::string& p = info.path;
    DSV4_CHECK(begin >= 0 && begin <= end && end <= info.num_tokens, "{}: {}[{}, {}) is outside [0, {})", p, name,
               begin, end, info.num_tokens);
    if (end == begin) return;
    Hid fspace(h5(H5Dget_space(ds), p, name), H5Sclose);
    hsize_t start[1] = {static_cast<hsize_t>(begin)}, count[1] = {static_cast<hsize_t>(end - begin)};
    h5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr), p, name);
    Hid mspace(h5(H5Screate_simple(1, count, nullptr), p, name), H5Sclose);
    h5(H5Dread(ds, memtype, mspace, fspace, H5P_DEFAULT, out), p, name);
  }
};

namespace {
Hid open_1d(hid_t file, const char* name, H5T_class_t cls, size_t size, bool is_signed, int64_t& len,
            const std::string& path) {
  DSV4_CHECK(H5Lexists(file, name, H5P_DEFAULT) > 0, "{}: missing dataset {}", path, name);
  Hid dapl(h5(H5Pcreate(H5P_DATASET_ACCESS), path, "H5Pcreate"), H5Pclose);
  h5(H5Pset_chunk_cache(dapl, 12421, 64u << 20, 1.0), path, "H5Pset_chunk_cache");
  Hid ds(h5(H5Dopen2(file, name, dapl), path, name), H5Dclose);
  Hid type(h5(H5Dget_type(ds), path, name), H5Tclose);
  const bool sign_ok = (H5Tget_sign(type) == H5T_SGN_2) == is_signed;
  DSV4_CHECK(H5Tget_class(type) == cls && H5Tget_size(type) == size && sign_ok, "{}: dataset {} must be {}{} bits",
             path, name, is_signed ? "int" : "uint", size * 8);
  Hid space(h5(H5Dget_space(ds), path, name), H5Sclose);
  DSV4_CHECK(H5Sget_simple_extent_ndims(space) == 1, "{}: dataset {} must be one-dimensional", path, name);
  hsize_t dims[1] = {0};
  H5Sget_simple_extent_dims(space, dims, nullptr);
  len = static_cast<int64_t>(dims[0]);
  return ds;
}
}  // namespace

DatasetReader::DatasetReader(const std::string& path) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  QuietHdf5 quiet;
  m.info.path = path;
  DSV4_CHECK(std::filesystem::is_regular_file(path), "{}: no such dataset file", path);
  DSV4_CHECK(H5Fis_hdf5(path.c_str()) > 0, "{}: not an HDF5 file", path);
  m.file = Hid(h5(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path, "opening"), H5Fclose);
  DatasetInfo& in = m.info;
  in.format_version = read_attr_i64(m.file, "dsv4_format_version", path);
  DSV4_CHECK(in.format_version == kDatasetFormatVersion,
             "{}: dataset format version {} is not supported (this build reads version {})", path, in.format_version,
             kDatasetFormatVersion);
  in.format = read_attr_str(m.file, "format", path);
  in.vocab_size = read_attr_i64(m.file, "vocab_size", path);
  in.tokenizer_sha256 = read_attr_str(m.file, "tokenizer_sha256", path);
  in.bos_id = has_attr(m.file, "bos_id") ? read_attr_i64(m.file, "bos_id", path) : -1;
  in.eos_id = has_attr(m.file, "eos_id") ? read_attr_i64(m.file, "eos_id", path) : -1;
  in.source_file = has_attr(m.file, "source_file") ? read_attr_str(m.file, "source_file", path) : "";
  in.num_documents = read_attr_i64(m.file, "num_documents", path);
  in.num_tokens = read_attr_i64(m.file, "num_tokens", path);
  in.num_records = has_attr(m.file, "num_records") ? read_attr_i64(m.file, "num_records", path) : 0;
  in.num_skipped = has_attr(m.file, "num_skipped") ? read_attr_i64(m.file, "num_skipped", path) : 0;
  in.split = has_attr(m.file, "split") ? read_attr_str(m.file, "split", path) : "train";
  in.created_by = has_attr(m.file, "created_by") ? read_attr_str(m.file, "created_by", path) : "";
  DSV4_CHECK(in.vocab_size > 0, "{}: attribute vocab_size = {} must be positive", path, in.vocab_size);

  int64_t n_tok = 0, n_off = 0, n_mask = 0;
  m.dtok = open_1d(m.file, "/tokens", H5T_INTEGER, 4, true, n_tok, path);
  Hid doff = open_1d(m.file, "/doc_offsets", H5T_INTEGER, 8, true, n_off, path);
  in.has_loss_mask = H5Lexists(m.file, "/loss_mask", H5P_DEFAULT) > 0;
  if (in.has_loss_mask) {
    m.dmask = open_1d(m.file, "/loss_mask", H5T_INTEGER, 1, false, n_mask, path);
    DSV4_CHECK(n_mask == n_tok, "{}: /loss_mask has {} entries but /tokens has {}", path, n_mask, n_tok);
  }
  DSV4_CHECK(n_tok == in.num_tokens, "{}: /tokens has {} entries but attribute num_tokens = {}", path, n_tok,
             in.num_tokens);
  DSV4_CHECK(n_off == in.num_documents + 1, "{}: /doc_offsets has {} entries but num_documents = {} needs {}", path,
             n_off, in.num_documents, in.num_documents + 1);
  m.offsets.resize(static_cast<size_t>(n_off));
  if (n_off > 0) h5(H5Dread(doff, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, m.offsets.data()), path, "/doc_offsets");
  DSV4_CHECK(!m.offsets.empty() && m.offsets.front() == 0, "{}: /doc_offsets[0] must be 0", path);
  for (size_t d = 1; d < m.offsets.size(); ++d)
    DSV4_CHECK(m.offsets[d] >= m.offsets[d - 1], "{}: /doc_offsets decreases at document {} ({} < {})", path, d - 1,
               m.offsets[d], m.offsets[d - 1]);
  DSV4_CHECK(m.offsets.back() == n_tok, "{}: /doc_offsets ends at {} but /tokens has {} entries", path,
             m.offsets.back(), n_tok);
}

DatasetReader::~DatasetReader() {
  if (impl_) {
    QuietHdf5 quiet;
    impl_.reset();
  }
}
DatasetReader::DatasetReader(DatasetReader&&) noexcept = default;
DatasetReader& DatasetReader::operator=(DatasetReader&&) noexcept = default;

const DatasetInfo& DatasetReader::info() const { return impl_->info; }
const std::vector<int64_t>& DatasetReader::doc_offsets() const { return impl_->offsets; }
bool DatasetReader::preloaded() const { return impl_->preloaded; }

void DatasetReader::read_tokens(int64_t begin, int64_t end, int32_t* out) const {
  const Impl& m = *impl_;
  if (m.preloaded) {
    DSV4_CHECK(begin >= 0 && begin <= end && end <= m.info.num_tokens, "{}: tokens[{}, {}) outside [0, {})",
               m.info.path, begin, end, m.info.num_tokens);
    std::copy(m.tokens_mem.begin() + begin, m.tokens_mem.begin() + end, out);
    return;
  }
  QuietHdf5 quiet;
  m.read(m.dtok, H5T_NATIVE_INT32, begin, end, out, "/tokens");
}

void DatasetReader::read_mask(int64_t begin, int64_t end, uint8_t* out) const {
  const Impl& m = *impl_;
  DSV4_CHECK(m.info.has_loss_mask, "{}: the dataset has no /loss_mask", m.info.path);
  if (m.preloaded) {
    DSV4_CHECK(begin >= 0 && begin <= end && end <= m.info.num_tokens, "{}: loss_mask[{}, {}) outside [0, {})",
               m.info.path, begin, end, m.info.num_tokens);
    std::copy(m.mask_mem.begin() + begin, m.mask_mem.begin() + end, out);
    return;
  }
  QuietHdf5 quiet;
  m.read(m.dmask, H5T_NATIVE_UINT8, begin, end, out, "/loss_mask");
}

void DatasetReader::preload() {
  Impl& m = *impl_;
  if (m.preloaded) return;
  QuietHdf5 quiet;
  m.tokens_mem.resize(static_cast<size_t>(m.info.num_tokens));
  m.read(m.dtok, H5T_NATIVE_INT32, 0, m.info.num_tokens, m.tokens_mem.data(), "/tokens");
  if (m.info.has_loss_mask) {
    m.mask_mem.resize(static_cast<size_t>(m.info.num_tokens));
    m.read(m.dmask, H5T_NATIVE_UINT8, 0, m.info.num_tokens, m.mask_mem.data(), "/loss_mask");
  }
  m.preloaded = true;
}

void check_dataset_compatible(const DatasetInfo& info, int64_t model_vocab_size,
                              const std::string& expected_tokenizer_sha256) {
  DSV4_CHECK(info.vocab_size <= model_vocab_size,
             "{}: the dataset was tokenised with a {}-id vocabulary (tokenizer sha256 {}) but the model's vocab_size "
             "is {}: ids up to {} would index past the embedding. Re-run dsv4-prep with the model's tokenizer.json.",
             info.path, info.vocab_size, info.tokenizer_sha256, model_vocab_size, info.vocab_size - 1);
  if (!expected_tokenizer_sha256.empty())
    DSV4_CHECK(info.tokenizer_sha256 == expected_tokenizer_sha256,
               "{}: the dataset was tokenised with tokenizer sha256 {} but the model's tokenizer.json has sha256 {}: "
               "different tokenizers map text to different ids. Re-run dsv4-prep --tokenizer <the model's "
               "tokenizer.json>.",
               info.path, info.tokenizer_sha256, expected_tokenizer_sha256);
}

void install_temp_file_cleanup() {
  struct sigaction sa {};
  sa.sa_handler = cleanup_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

}  // namespace dsv4::data
