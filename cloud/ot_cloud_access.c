/* offtune-cloud access: the operator's side of admission, on the access file that the
 * daemon loads (docs/protocol.md): allow or revoke a device's public key, or issue a
 * one-time enrolment token (printed once; only its hash is stored). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_access.h"
#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"

int ot_cmd_access(int argc, char **argv) {
  const char *file = NULL, *allow = NULL, *revoke = NULL;
  int issue = 0;
  const ot_opt opts[] = {
      {"file", OT_OPT_STR, &file, "FILE", "access file (created if missing; required)"},
      {"allow", OT_OPT_STR, &allow, "PUB", "allow the device whose .pub file (or 64-hex key) is given"},
      {"revoke", OT_OPT_STR, &revoke, "PUB", "revoke a device (.pub file or 64-hex key); wins over allow"},
      {"issue-token", OT_OPT_FLAG, &issue, NULL, "print a new one-time enrolment token"},
  };
  int n_opts = (int)(sizeof opts / sizeof opts[0]);
  const char *syn = "offtune-cloud access --file FILE (--allow PUB | --revoke PUB | --issue-token)";
  const char *desc = "Edits the list of devices the cloud admits.";
  int rc = ot_cli_parse(argc, argv, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, n_opts);
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !file) rc = ot_error(OT_ERR_INVALID, "--file FILE is required");
  if (rc == OT_OK && (!!allow + !!revoke + !!issue) != 1)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --allow, --revoke, --issue-token");
  if (rc) {
    fprintf(stderr, "offtune-cloud: access: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, desc, opts, n_opts);
    return OT_EXIT_USAGE;
  }
  ot_access *a = NULL;
  rc = ot_access_new(&a);
  if (rc == OT_OK && ot_file_exists(file)) rc = ot_access_load(a, file);
  uint8_t pk[OT_PK_BYTES];
  char fp[OT_FINGERPRINT_LEN], token[OT_TOKEN_CHARS + 1];
  const char *key = allow ? allow : revoke;
  if (rc == OT_OK && key) {
    rc = ot_file_exists(key) ? ot_pubkey_load(key, pk) : ot_pubkey_parse(key, pk);
    if (rc == OT_OK) {
      ot_fingerprint(pk, fp);
      rc = allow ? ot_access_allow(a, pk) : ot_access_revoke(a, pk);
    }
  }
  if (rc == OT_OK && issue) rc = ot_access_issue_token(a, token);
  if (rc == OT_OK) rc = ot_access_save(a, file);
  ot_access_free(a);
  if (rc) return ot_cmd_fail("access", rc);
  if (allow) printf("allowed %s\n", fp);
  if (revoke) printf("revoked %s\n", fp);
  if (issue) printf("%s\n", token);
  return OT_EXIT_OK;
}
