// Small POSIX file helpers for fxp-train. Not std::filesystem: libtorch.so
// exports its own copies of those symbols (see docs/design.md).
#pragma once

#include <stdexcept>
#include <string>

namespace fxp::train {

bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
// mkdir -p; throws std::runtime_error naming the path.
void make_dirs(const std::string& path);
// Writes to <path>.tmp, flushes it to disk, then renames it over `path`, so a
// reader (or a crash) never sees a half-written file. On any failure (a full
// disk, a file-size limit) the temporary file is removed, `path` keeps its
// previous contents, and std::runtime_error names the file and the reason.
void atomic_write(const std::string& path, const std::string& contents);
void remove_file(const std::string& path);
std::string read_text(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);
// `path` made absolute (from the working directory), its longest leading part
// that exists made canonical (symbolic links, `.` and `..` resolved, realpath)
// and the rest appended, the whole lexically normal: what
// std::filesystem::weakly_canonical(absolute(path)) gives, without
// std::filesystem (above).
std::string weakly_canonical_path(const std::string& path);

// Note [Checksummed files]
// A checkpoint is written as its bytes followed by a footer line
//   "\nfxp-checksum sha1 <40 hex digits> <byte count>\n",
// and read back only if the footer is there and matches, so a flipped byte or
// a truncated file is refused instead of resuming from other numbers.
std::string with_checksum(const std::string& contents);
// The contents of `bytes` (a file read from `path`) without the footer;
// throws std::runtime_error naming the file when the footer is missing or wrong.
std::string without_checksum(const std::string& bytes, const std::string& path);

// Another process holds the lock of a run directory.
struct DirectoryBusy : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Note [Run directory lock]
// fxp-train holds an exclusive flock on <dir>/.lock while it trains there, so
// a second fxp-train (or a sweep that was killed and restarted while its
// child goes on) cannot train the same run twice: it gets DirectoryBusy
// (fxp-train exits with kExitBusy). The file holds the owner's pid, for the
// message; it is never removed (removing it would let two processes lock two
// different files). The OS releases the lock when the process dies.
// A directory this process may not write (a read-only file system, another
// user's results) gets a shared lock on a read-only descriptor instead, or
// none where it has no lock file: enough to show a finished run's summary
// (or to wait for an owner that trains there), and any write then fails
// with an error that names the file.
class DirectoryLock {
 public:
  explicit DirectoryLock(const std::string& dir);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

// fxp-train's exit status when the run directory is busy (EX_TEMPFAIL).
constexpr int kExitBusy = 75;

}  // namespace fxp::train
