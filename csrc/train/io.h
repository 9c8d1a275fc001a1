// Small POSIX file helpers for fxp-train. Not std::filesystem: libtorch.so
// exports its own copies of those symbols (see docs/design.md).
#pragma once

#include <string>

namespace fxp::train {

bool path_exists(const std::string& path);
// mkdir -p; throws std::runtime_error naming the path.
void make_dirs(const std::string& path);
// Writes to <path>.tmp, flushes it to disk, then renames it over `path`, so a
// reader (or a crash) never sees a half-written file.
void atomic_write(const std::string& path, const std::string& contents);
// Renames `tmp` over `path` after flushing it (for files written by other code).
void atomic_replace(const std::string& tmp, const std::string& path);
void remove_file(const std::string& path);
std::string read_text(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);

}  // namespace fxp::train
