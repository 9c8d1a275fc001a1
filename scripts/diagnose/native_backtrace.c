/* LD_PRELOAD helper for scripts/diagnose/error_paths.py: on SIGSEGV, SIGBUS or
 * SIGABRT, prints the native stack (glibc's backtrace_symbols_fd) to stderr,
 * then dies of the same signal. Python's faulthandler shows only Python frames. */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void on_fatal_signal(int sig) {
  void* frames[128];
  const int n = backtrace(frames, 128);
  static const char header[] = "\n=== native backtrace (scripts/diagnose/native_backtrace.c) ===\n";
  (void)!write(2, header, sizeof header - 1);
  /* Python's faulthandler marks no thread when the signal hits one without Python state (the op
     releases the GIL), so say here whether the main thread faulted. */
  static const char on_main[] = "faulting thread: the main thread\n";
  static const char on_other[] = "faulting thread: NOT the main thread\n";
  if (syscall(SYS_gettid) == getpid()) {
    (void)!write(2, on_main, sizeof on_main - 1);
  } else {
    (void)!write(2, on_other, sizeof on_other - 1);
  }
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  static char alternate_stack[1 << 16];  /* a stack overflow still gets its report */
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = alternate_stack;
  ss.ss_size = sizeof alternate_stack;
  sigaltstack(&ss, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_fatal_signal;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
  sigaction(SIGABRT, &sa, 0);
}
