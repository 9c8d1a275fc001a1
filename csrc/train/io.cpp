#include "train/io.h"

#include <c10/util/hash.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <vector>

namespace fxp::train {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_dirs(const std::string& path) {
  if (path.empty()) return;
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) fail("cannot create directory", prefix);
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw std::runtime_error("cannot create directory " + path + ": a file is in the way");
  }
}

void atomic_write(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp";
  auto fail_and_clean = [&](const std::string& what, int error) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(what + " " + tmp + ": " + std::strerror(error) + " (" + path + " is unchanged)");
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) fail_and_clean("cannot create", errno);
  const char* data = contents.data();
  size_t left = contents.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, data, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = n < 0 ? errno : ENOSPC;
      ::close(fd);
      fail_and_clean("cannot write", error);
    }
    data += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int error = errno;
    ::close(fd);
    fail_and_clean("cannot flush", error);
  }
  if (::close(fd) != 0) fail_and_clean("cannot close", errno);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail_and_clean("cannot rename to " + path + ":", errno);
}

void remove_file(const std::string& path) {
  if (std::remove(path.c_str()) != 0 && errno != ENOENT) fail("cannot remove", path);
}

std::string read_text(const std::string& path) {
  if (is_directory(path)) {
    // A stream opens a directory and reads nothing, which would read as an empty or truncated file.
    const std::string checkpoint = join_path(path, "checkpoint.pt");
    throw std::runtime_error("cannot read " + path + ": it is a directory" +
                             (path_exists(checkpoint) ? " (did you mean " + checkpoint + "?)" : ""));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read", path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string weakly_canonical_path(const std::string& path) {
  std::string absolute = path;
  if (absolute.empty() || absolute[0] != '/') {
    char* cwd = ::getcwd(nullptr, 0);
    absolute = join_path(cwd != nullptr ? cwd : "/", path);
    std::free(cwd);
  }
  std::vector<std::string> parts;
  std::istringstream split(absolute);
  for (std::string part; std::getline(split, part, '/');) {
    if (!part.empty()) parts.push_back(part);
  }
  // The leading parts that exist, walked from the root as libstdc++'s weakly_canonical walks them.
  std::string existing = "/";
  size_t n = 0;
  while (n < parts.size() && path_exists(join_path(existing, parts[n]))) existing = join_path(existing, parts[n++]);
  char* resolved = ::realpath(existing.c_str(), nullptr);
  std::vector<std::string> normal;
  if (resolved != nullptr) {
    std::istringstream canonical(resolved);
    for (std::string part; std::getline(canonical, part, '/');) {
      if (!part.empty()) normal.push_back(part);
    }
    std::free(resolved);
    parts.erase(parts.begin(), parts.begin() + static_cast<std::ptrdiff_t>(n));
  }
  for (const std::string& part : parts) {  // lexically normal: "/.." is "/"
    if (part == ".") continue;
    if (part == "..") {
      if (!normal.empty()) normal.pop_back();
      continue;
    }
    normal.push_back(part);
  }
  std::string out;
  for (const std::string& part : normal) out += "/" + part;
  return out.empty() ? "/" : out;
}

}  // namespace fxp::train

namespace fxp::train {
namespace {
constexpr const char* kChecksumTag = "\nfxp-checksum sha1 ";
constexpr size_t kSha1Hex = 40;

std::string sha1_hex(const char* data, size_t size) { return c10::sha1(std::string(data, size)).str(); }
}  // namespace

std::string with_checksum(const std::string& contents) {
  return contents + kChecksumTag + sha1_hex(contents.data(), contents.size()) + " " +
         std::to_string(contents.size()) + "\n";
}

std::string without_checksum(const std::string& bytes, const std::string& path) {
  const size_t tag = bytes.rfind(kChecksumTag);
  auto refuse = [&](const std::string& why) {
    // Read by --resume and by --init-from: the advice covers both.
    throw std::runtime_error("checkpoint " + path + " " + why +
                             "; it is never read (a run's own: start it again with --overwrite; for --init-from, "
                             "give the checkpoint.pt of a finished run)");
  };
  if (tag == std::string::npos) refuse("has no checksum (truncated, or not written by this fxp-train)");
  std::istringstream footer(bytes.substr(tag + std::strlen(kChecksumTag)));
  std::string hex;
  size_t size = 0;
  footer >> hex >> size;
  if (hex.size() != kSha1Hex || size != tag) refuse("has a damaged checksum line (truncated or corrupted)");
  if (sha1_hex(bytes.data(), tag) != hex) refuse("is corrupted: its SHA-1 does not match the one stored with it");
  return bytes.substr(0, tag);
}

DirectoryLock::DirectoryLock(const std::string& dir) {
  const std::string path = join_path(dir, ".lock");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  bool shared = false;
  if (fd_ < 0 && (errno == EROFS || errno == EACCES)) {  // Note [Run directory lock]: read-only
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0 && errno == ENOENT) return;  // no lock file, and none can be made: nothing to share
    shared = true;
  }
  if (fd_ < 0) fail("cannot open the lock file", path);
  // A sweep probes the lock for an instant (scripts/sweeplib.py); a short retry rides over that.
  int error = 0;
  for (int attempt = 0; attempt < 20; ++attempt) {
    error = ::flock(fd_, (shared ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0 ? 0 : errno;
    if (error != EWOULDBLOCK) break;
    ::usleep(50 * 1000);
  }
  if (error != 0) {
    std::string owner = read_text(path);
    while (!owner.empty() && (owner.back() == '\n' || owner.back() == ' ')) owner.pop_back();
    ::close(fd_);
    if (error == EWOULDBLOCK) {
      throw DirectoryBusy("output directory " + dir + " is in use by another fxp-train" +
                          (owner.empty() ? std::string() : " (pid " + owner + ")") +
                          "; wait for it to finish, or stop it first");
    }
    errno = error;
    fail("cannot lock", path);
  }
  if (shared) return;  // a read-only descriptor: the owner's pid stays
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    // The pid is only for messages; the lock itself is held.
  }
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock
}

}  // namespace fxp::train
