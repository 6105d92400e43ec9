/* /usr/sbin/nginx of the CRI tests' web server images (e2e-test-images/
 * nginx:1.14-2 and cri-tools' hostnet-nginx): what critest looks for in a
 * real nginx, over busybox's httpd.
 *   - the master process is named nginx (pidof nginx) and its command line
 *     reads "nginx: master process ..." (/proc/1/cmdline): it re-executes
 *     itself under that argv[0];
 *   - it writes its pid to /var/run/nginx.pid;
 *   - it serves $NGINX_ROOT (default /usr/share/nginx/html) on port
 *     $NGINX_PORT (default 80) through a `busybox httpd -f` child;
 *   - SIGTERM, SIGINT or SIGQUIT end the child and the master at once.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MASTER "nginx: master process nginx -g daemon off;"

static pid_t child;

static void quit(int sig)
{
	(void)sig;
	if (child > 0)
		kill(child, SIGTERM);
	_exit(0);
}

int main(int argc, char **argv)
{
	const char *port = getenv("NGINX_PORT"), *root = getenv("NGINX_ROOT");
	struct sigaction q = { .sa_handler = quit };
	FILE *f;
	int status;

	(void)argc;
	if (strcmp(argv[0], MASTER) != 0) {
		/* By its own path, not /proc/self/exe: the process name is the
		 * executed file's base name, and pidof looks for nginx. */
		char self[4096], *a[] = { MASTER, NULL };
		ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
		if (n <= 0) {
			perror("nginx: /proc/self/exe");
			return 1;
		}
		self[n] = 0;
		execv(self, a);
		perror("nginx: re-exec");
		return 1;
	}
	if (!port)
		port = "80";
	if (!root)
		root = "/usr/share/nginx/html";
	sigaction(SIGTERM, &q, NULL);
	sigaction(SIGINT, &q, NULL);
	sigaction(SIGQUIT, &q, NULL);
	f = fopen("/var/run/nginx.pid", "w");
	if (!f) {
		perror("nginx: /var/run/nginx.pid");
		return 1;
	}
	fprintf(f, "%d\n", (int)getpid());
	fclose(f);
	child = fork();
	if (child < 0) {
		perror("nginx: fork");
		return 1;
	}
	if (child == 0) {
		execl("/bin/busybox", "httpd", "-f", "-p", port, "-h", root, (char *)NULL);
		perror("nginx: exec busybox httpd");
		_exit(127);
	}
	fprintf(stderr, "nginx: master %d serving %s on port %s (busybox httpd %d)\n", (int)getpid(), root, port, (int)child);
	for (;;) {
		pid_t p = wait(&status);
		if (p == child)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		if (p < 0 && errno == ECHILD)
			return 1;
	}
}
