// An LD_AUDIT library that makes every load of libcudart.so.13 or libcuda.so.1
// take the stand-ins in $FXP_FAKE_CUDA_DIR. LD_PRELOAD alone is not enough:
// torch finds its own libcudart through DT_RPATH, and scripts that set
// LD_PRELOAD for their children (error_paths.py does, for its backtrace
// handler) would drop the stand-in; LD_AUDIT is left alone and is inherited.
#define _GNU_SOURCE
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

unsigned la_version(unsigned version) { return version; }

char* la_objsearch(const char* name, uintptr_t* cookie, unsigned flag) {
  static char path[4096];
  const char* dir = getenv("FXP_FAKE_CUDA_DIR");
  const char* base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
  if (flag != LA_SER_ORIG || !dir || (strcmp(base, "libcudart.so.13") != 0 && strcmp(base, "libcuda.so.1") != 0))
    return (char*)name;
  snprintf(path, sizeof path, "%s/%s", dir, base);
  return path;
}
