/*
 * agentflow-launch: the first process of every session spawn, in place of the chain
 * `sh -c ENTER` (join the session's cgroups) -> `setpriv` (become the session's uid, no
 * capabilities) -> `env --default-signal` (a server started with SIGINT ignored must not pass
 * that on). One exec instead of three; each exec costs ~0.6 ms of CPU here.
 *
 *   agentflow-launch [--cgroup-fd FD]... [--mntns-fd FD] [--nice N] [--uid UID] -- PROGRAM [ARG]...
 *
 * --cgroup-fd FD  an inherited descriptor of a `cgroup.procs` file, opened for writing by the
 *                 server: this process joins that cgroup, then closes FD (no path is ever
 *                 taken from argv, and the descriptor never reaches PROGRAM).
 * --mntns-fd FD   an inherited descriptor of the session's mount namespace: this process
 *                 enters it (so PROGRAM sees the session's home and /tmp mounts, which the
 *                 host does not have), then closes FD.
 * --nice N        set this process's niceness to N (-20..19), inherited by PROGRAM.
 * --uid UID       become UID (and gid UID, no supplementary groups) with every capability
 *                 dropped: bounding, inheritable, permitted, effective and ambient sets.
 *
 * Always: every signal back to its default disposition and an empty signal mask, so PROGRAM
 * starts as a freshly booted process would, whatever the server ignored or blocked.
 * PROGRAM is looked up in PATH like a shell's `exec` does.
 *
 * Exit status (a shell's conventions): 126 when the launch itself fails (bad arguments, a
 * step refused by the kernel, PROGRAM not executable), 127 when PROGRAM is not found. The
 * reason goes to stderr, one line, prefixed `agentflow-launch:`.
 *
 * Order matters: the cgroups are joined first (nothing this process does may escape their
 * limits or membership), the namespace is entered and the niceness set while still
 * privileged, and the uid switch comes last before the signal reset and exec.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/magic.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef CGROUP2_SUPER_MAGIC
#define CGROUP2_SUPER_MAGIC 0x63677270
#endif
#ifndef CGROUP_SUPER_MAGIC
#define CGROUP_SUPER_MAGIC 0x27e0eb
#endif

#define MAX_CGROUP_FDS 16
#define EXIT_CANNOT_RUN 126
#define EXIT_NOT_FOUND 127

static void fail(int status, int err, const char *fmt, ...) {
  char message[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof message, fmt, ap);
  va_end(ap);
  if (err)
    dprintf(2, "agentflow-launch: %s: %s\n", message, strerror(err));
  else
    dprintf(2, "agentflow-launch: %s\n", message);
  _exit(status);
}

/* A whole decimal integer in [lo, hi]; anything else (empty, sign junk, trailing text,
 * overflow) is a usage error naming the option. */
static long long parse_int(const char *option, const char *text, long long lo, long long hi) {
  char *end = NULL;
  if (text == NULL || *text == '\0')
    fail(EXIT_CANNOT_RUN, 0, "%s needs a value", option);
  errno = 0;
  long long value = strtoll(text, &end, 10);
  if (errno || *end != '\0' || end == text || value < lo || value > hi)
    fail(EXIT_CANNOT_RUN, 0, "%s: %.40s is not an integer from %lld to %lld", option, text, lo, hi);
  return value;
}

/* `--name VALUE` or `--name=VALUE`; returns the value or NULL when argv[*i] is not --name. */
static const char *option_value(int argc, char **argv, int *i, const char *name) {
  size_t len = strlen(name);
  if (strncmp(argv[*i], name, len) != 0)
    return NULL;
  if (argv[*i][len] == '=')
    return argv[*i] + len + 1;
  if (argv[*i][len] != '\0')
    return NULL;
  if (*i + 1 >= argc)
    fail(EXIT_CANNOT_RUN, 0, "%s needs a value", name);
  return argv[++*i];
}

static void join_cgroup(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) < 0)
    fail(EXIT_CANNOT_RUN, errno, "--cgroup-fd %d", fd);
  if (fs.f_type != CGROUP_SUPER_MAGIC && fs.f_type != CGROUP2_SUPER_MAGIC)
    fail(EXIT_CANNOT_RUN, 0, "--cgroup-fd %d is not a file of a cgroup filesystem", fd);
  /* "0" names the writer itself, in cgroup v1 and v2 alike. */
  if (write(fd, "0", 1) != 1)
    fail(EXIT_CANNOT_RUN, errno, "joining the session's cgroup (fd %d)", fd);
  if (close(fd) < 0)
    fail(EXIT_CANNOT_RUN, errno, "closing --cgroup-fd %d", fd);
}

static void enter_mount_namespace(int fd) {
  /* setns checks the descriptor is a mount namespace (EINVAL otherwise). */
  if (setns(fd, CLONE_NEWNS) < 0)
    fail(EXIT_CANNOT_RUN, errno, "entering the session's mount namespace (--mntns-fd %d)", fd);
  if (close(fd) < 0)
    fail(EXIT_CANNOT_RUN, errno, "closing --mntns-fd %d", fd);
}

static void become(uid_t uid) {
  /* The bounding set first: dropping from it needs CAP_SETPCAP, gone after setresuid. Stop at
   * the first capability this kernel does not know (EINVAL). */
  for (int cap = 0; cap < 64; cap++) {
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
      continue;
    if (errno == EINVAL)
      break;
    fail(EXIT_CANNOT_RUN, errno, "dropping capability %d from the bounding set", cap);
  }
  if (setgroups(0, NULL) < 0)
    fail(EXIT_CANNOT_RUN, errno, "clearing the supplementary groups");
  if (setresgid(uid, uid, uid) < 0)
    fail(EXIT_CANNOT_RUN, errno, "setresgid(%u)", (unsigned)uid);
  if (setresuid(uid, uid, uid) < 0)
    fail(EXIT_CANNOT_RUN, errno, "setresuid(%u)", (unsigned)uid);
  /* setresuid from root to non-root empties the permitted, effective and ambient sets; the
   * inheritable set survives it, so clear all of them explicitly. */
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
  memset(data, 0, sizeof data);
  if (syscall(SYS_capset, &header, data) < 0)
    fail(EXIT_CANNOT_RUN, errno, "clearing the capability sets");
  /* Belt and braces: the switch must be irreversible. */
  if (setresuid(0, 0, 0) == 0 || getuid() != uid || geteuid() != uid || getgid() != uid || getegid() != uid)
    fail(EXIT_CANNOT_RUN, 0, "the switch to uid %u did not hold", (unsigned)uid);
}

static void default_signals(void) {
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  for (int sig = 1; sig < NSIG; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP)
      continue;
    /* EINVAL for the few real-time signals the C library reserves for itself: skip them. */
    if (sigaction(sig, &dfl, NULL) < 0 && errno != EINVAL)
      fail(EXIT_CANNOT_RUN, errno, "resetting signal %d", sig);
  }
  sigset_t none;
  sigemptyset(&none);
  if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
    fail(EXIT_CANNOT_RUN, errno, "unblocking signals");
}

int main(int argc, char **argv) {
  int cgroup_fds[MAX_CGROUP_FDS];
  int n_cgroup_fds = 0;
  int have_nice = 0, have_uid = 0, have_mntns = 0;
  long long nice_value = 0, uid_value = 0, mntns_fd = -1;
  int i = 1;
  for (; i < argc; i++) {
    const char *value;
    if (strcmp(argv[i], "--") == 0)
      break;
    if ((value = option_value(argc, argv, &i, "--cgroup-fd")) != NULL) {
      if (n_cgroup_fds == MAX_CGROUP_FDS)
        fail(EXIT_CANNOT_RUN, 0, "more than %d --cgroup-fd options", MAX_CGROUP_FDS);
      /* Never 0-2: those are the program's standard streams. */
      cgroup_fds[n_cgroup_fds++] = (int)parse_int("--cgroup-fd", value, 3, INT_MAX);
    } else if ((value = option_value(argc, argv, &i, "--mntns-fd")) != NULL) {
      if (have_mntns++)
        fail(EXIT_CANNOT_RUN, 0, "--mntns-fd given twice");
      mntns_fd = parse_int("--mntns-fd", value, 3, INT_MAX);
    } else if ((value = option_value(argc, argv, &i, "--nice")) != NULL) {
      if (have_nice++)
        fail(EXIT_CANNOT_RUN, 0, "--nice given twice");
      nice_value = parse_int("--nice", value, -20, 19);
    } else if ((value = option_value(argc, argv, &i, "--uid")) != NULL) {
      if (have_uid++)
        fail(EXIT_CANNOT_RUN, 0, "--uid given twice");
      /* Not 0: this option exists to leave root; (uid_t)-1 means "unchanged" to the kernel. */
      uid_value = parse_int("--uid", value, 1, (long long)UINT_MAX - 1);
    } else {
      fail(EXIT_CANNOT_RUN, 0, "unknown option %.60s (usage: agentflow-launch [--cgroup-fd FD]... "
                               "[--mntns-fd FD] [--nice N] [--uid UID] -- PROGRAM [ARG]...)", argv[i]);
    }
  }
  if (i >= argc)
    fail(EXIT_CANNOT_RUN, 0, "missing -- before the program");
  char **program = argv + i + 1;
  if (program[0] == NULL || program[0][0] == '\0')
    fail(EXIT_CANNOT_RUN, 0, "no program after --");

  for (int k = 0; k < n_cgroup_fds; k++)
    join_cgroup(cgroup_fds[k]);
  if (have_mntns)
    enter_mount_namespace((int)mntns_fd);
  if (have_nice && setpriority(PRIO_PROCESS, 0, (int)nice_value) < 0)
    fail(EXIT_CANNOT_RUN, errno, "setting niceness %lld", nice_value);
  if (have_uid)
    become((uid_t)uid_value);
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
    fail(EXIT_CANNOT_RUN, errno, "clearing the ambient capabilities");
  default_signals();

  execvp(program[0], program);
  fail(errno == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_RUN, errno, "%.200s", program[0]);
  return EXIT_CANNOT_RUN;
}
