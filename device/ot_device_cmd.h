/* offtune-device subcommands: each takes the arguments after its name and returns an
 * exit code: 0 success, 1 failure (a message was printed), 2 usage error. */
#ifndef OT_DEVICE_CMD_H
#define OT_DEVICE_CMD_H

enum { OT_EXIT_OK = 0, OT_EXIT_FAIL = 1, OT_EXIT_USAGE = 2 };

int ot_dev_tune(int argc, char **argv);
int ot_dev_eval(int argc, char **argv);
/* Sessions with the cloud daemon (ot_device_client.c). */
int ot_dev_join(int argc, char **argv);
int ot_dev_run(int argc, char **argv);
/* Prints "offtune-device: <what>: <detail>" and returns OT_EXIT_FAIL. */
int ot_dev_fail(const char *what, int status);

#endif
