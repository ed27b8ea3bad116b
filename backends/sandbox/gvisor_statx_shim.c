/* Strips AT_NO_AUTOMOUNT from stat calls: the runsc build in Debian 12 (2022) answers EINVAL to it,
   which breaks coreutils (ls, stat, cp). Loaded with LD_PRELOAD inside gVisor only. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#define STRIP(f) ((f) & ~AT_NO_AUTOMOUNT)
int statx(int dfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return syscall(SYS_statx, dfd, path, STRIP(flags), mask, buf);
}
int fstatat(int dfd, const char *path, struct stat *buf, int flags) {
    return syscall(SYS_newfstatat, dfd, path, buf, STRIP(flags));
}
int fstatat64(int dfd, const char *path, struct stat64 *buf, int flags) {
    return syscall(SYS_newfstatat, dfd, path, buf, STRIP(flags));
}
